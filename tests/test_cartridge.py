"""Cartridge (a trained KV cache served as a prefix): against PEFT's checkpoints, training, generation
and initialisation utilities."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, switched_outputs
from test_generate import NEW, peft_greedy
from test_prefix import _decoder_with_prefixes, _seq2seq_calls

COUNT = 4


def _pair(name, seed=1, **extra):
    """(base model, PEFT's cartridge, fxpeft's): one seed before each, so both draw the same table."""
    model = models.HF_MODELS[name]().eval()
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.CartridgeConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=COUNT, **extra)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=COUNT, **extra))
    return model, reference, gm.eval()


def _tokenizer(chat_template=None):
    """A word-level tokenizer over a few words, built offline."""
    from tokenizers import Tokenizer, models as token_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = "the a cat dog sat on mat and ran far away".split()
    vocab = {"<unk>": 0, **{word: index + 1 for index, word in enumerate(words)}}
    tokenizer = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", pad_token="<unk>")
    wrapped.chat_template = chat_template
    return wrapped


TEXT = "the cat sat on the mat and the dog ran far away"


def test_config_fields_defaults_and_peft_validation():
    ours, theirs = fxpeft.CartridgeConfig(num_virtual_tokens=3), peft.CartridgeConfig(num_virtual_tokens=3)
    assert ours.num_frozen_tokens == theirs.num_frozen_tokens == 1
    assert ours.peft_type == theirs.peft_type == "CARTRIDGE"
    assert set(ours.to_dict()) <= set(theirs.to_dict())
    for bad, message in [(dict(num_frozen_tokens=-1), "`num_frozen_tokens` must be >= 0, got -1."),
                         (dict(num_frozen_tokens=4), "`num_frozen_tokens` must be <= `num_virtual_tokens`, got "
                                                     "num_frozen_tokens=4 and num_virtual_tokens=3.")]:
        for config_type in (peft.CartridgeConfig, fxpeft.CartridgeConfig):
            with pytest.raises(ValueError, match=f"^{message.replace('.', '[.]')}$"):
                config_type(num_virtual_tokens=3, **bad)
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        fxpeft.CartridgeConfig(num_virtual_tokens=0)
    assert fxpeft.CartridgeConfig(num_virtual_tokens=3, num_frozen_tokens=3).num_frozen_tokens == 3


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_checkpoint_loads_both_ways_with_equal_outputs(name, tmp_path):
    model, reference, _ = _pair(name)
    reference.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(saved) == {"prompt_embeddings"}  # PEFT's file: the whole table, frozen tokens included
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"))
    assert isinstance(gm.peft_config["default"], fxpeft.CartridgeConfig)
    full = models.hf_inputs(name, batch=2, seq=7)  # left padding on the first row
    for inputs in (full, {"input_ids": full["input_ids"][:, :5]}):
        labels = models.hf_labels(name, inputs)
        with torch.no_grad():
            got, expected = gm(**inputs, labels=labels), reference(**inputs, labels=labels)
            base = model(**inputs).logits
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        assert (got.logits - base).abs().max() > 1e-3  # the cartridge acts

    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    config = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_frozen_tokens"], config["num_virtual_tokens"]) == ("CARTRIDGE", 1, COUNT)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**full).logits, gm(**full).logits, rtol=1e-5, atol=1e-5)


def test_bart_decoder_self_attention_cartridge_matches_peft(tmp_path):
    """Encoder-decoder: the table goes in front of the decoder's self-attentions only, in PEFT's seq2seq order."""
    model = models.bart().eval()
    call = _seq2seq_calls()[0]
    config = dict(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3)
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.CartridgeConfig(**config)).eval()
    torch.manual_seed(1)
    gm = fxpeft.transform(model, fxpeft.CartridgeConfig(**config), example_inputs=call).eval()
    assert {row.path for row in fxpeft.inspect(gm).rows} == {f"model.decoder.layers.{i}.self_attn" for i in range(2)}
    with torch.no_grad():
        got, expected = gm(**call), reference(**call)
        assert (got.logits - model(**call).logits).abs().max() > 1e-3
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    fxpeft.save_pretrained(gm, str(tmp_path))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, got.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,frozen", [("llama", 1), ("qwen2", 2), ("gpt2", 0)])
def test_training_matches_peft_and_frozen_tokens_stay(name, frozen, tmp_path):
    model, reference, gm = _pair(name, num_frozen_tokens=frozen)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    ours, theirs = dict(gm.prompt_encoder.default.named_parameters()), \
        dict(reference.prompt_encoder.default.named_parameters())
    assert {n: (p.shape, p.requires_grad) for n, p in ours.items()} == \
        {n: (p.shape, p.requires_grad) for n, p in theirs.items()}
    for key in ours:  # the same seed draws PEFT's table
        assert torch.equal(ours[key], theirs[key])
    start = gm.prompt_encoder.default().detach().clone()
    # eval mode: GPT-2's dropout would draw differently in the two models; gradients flow all the same
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=0.1) for m in (gm, reference)]
    inputs = models.hf_inputs(name, batch=2, seq=7)
    labels = models.hf_labels(name, inputs)
    for _ in range(3):
        losses = []
        for module, optimizer in zip((gm, reference), optimizers):
            loss = module(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)
    table = gm.prompt_encoder.default().detach()
    assert torch.equal(table[:frozen], start[:frozen])  # no gradient reached the frozen tokens
    assert (table[frozen:] - start[frozen:]).abs().min() > 0  # every trainable entry moved

    fxpeft.save_pretrained(gm, str(tmp_path))  # resumes training: the table loads into both parts
    resumed = fxpeft.from_pretrained(model, str(tmp_path), is_trainable=True)
    assert {n: p.requires_grad for n, p in resumed.prompt_encoder.default.named_parameters()} == \
        {n: p.requires_grad for n, p in ours.items()}
    assert torch.equal(resumed.prompt_encoder.default(), table)


def test_custom_decoder_formula_gradients_and_compile():
    """The formula on a model PEFT cannot wrap: the table's slices 2l / 2l+1 in front of layer l's keys and
    values; gradients reach the trainable tokens only; compiled equals eager."""
    torch._dynamo.reset()
    model = models.TinyDecoder().eval()
    ids = torch.randint(0, models.VOCAB, (2, 9))
    gm = fxpeft.transform(model, fxpeft.CartridgeConfig(num_virtual_tokens=3, num_frozen_tokens=2),
                          example_inputs=(ids,))
    table = gm.prompt_encoder.default()
    assert table.shape == (3, 2 * 2 * 32)
    torch.testing.assert_close(gm(ids), _decoder_with_prefixes(model, table, ids, 3))
    gm(ids).logsumexp(-1).mean().backward()
    assert {n for n, p in gm.named_parameters() if p.grad is not None} == {"prompt_encoder.default.trainable_embedding"}
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=models.COMPILE_BACKEND)
    for batch, seq in [(2, 9), (3, 5)]:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        torch.testing.assert_close(compiled(ids), gm(ids), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_generate_matches_greedy_over_peft_forward(name):
    """The cartridge goes into the cache once, then each step reads the real tokens; tokens and logits
    equal greedy decoding over PEFT's forward (PEFT 0.21.2's generate serves KV prefixes wrongly on
    transformers 5.24, see tests/test_generate.py)."""
    _, reference, gm = _pair(name)
    inputs = models.hf_inputs(name, batch=2)  # left padding on the first row
    expected, logits = peft_greedy(reference, inputs["input_ids"], inputs["attention_mask"], NEW)
    got = gm.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0, return_dict_in_generate=True,
                      output_logits=True)
    assert torch.equal(got.sequences, expected)
    for ours, theirs in zip(got.logits, logits, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert int(got.past_key_values.layers[0].cumulative_length) == COUNT + 7 + NEW - 1
    # why the oracle is PEFT's forward: its generate disagrees with it (if this fails, compare with generate)
    assert not torch.equal(reference.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0), expected)


@pytest.mark.parametrize("chat_template", [None, "{% for m in messages %}{{ m['content'] }} away{% endfor %}"])
def test_initialize_from_text_and_cache_match_peft(chat_template):
    model, reference, gm = _pair("llama")
    tokenizer = _tokenizer(chat_template)
    for kwargs in ({}, {"max_length": 6}, {"use_chat_template": False}):
        expected = peft.initialize_kv_prefix_from_text(reference, tokenizer, text=TEXT, **kwargs)
        got = fxpeft.initialize_kv_prefix_from_text(gm, tokenizer, text=TEXT, **kwargs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        assert torch.equal(gm.prompt_encoder.default(), reference.prompt_encoder.default.weight)
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)

    ids = torch.randint(0, models.VOCAB, (1, 6))
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    legacy = [(layer.keys, layer.values) for layer in cache.layers]
    for past in (cache, legacy):
        expected = peft.initialize_kv_prefix_from_past_key_values(reference, past_key_values=past)
        got = fxpeft.initialize_kv_prefix_from_past_key_values(gm, past_key_values=past)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # the formula: token t's row holds layer l's keys (heads · head_dim) at slice 2l, values at 2l+1
    table = gm.prompt_encoder.default().view(COUNT, 2 * 2, 2, 8)
    assert torch.equal(table[:, 3], legacy[1][1][0, :, :COUNT].transpose(0, 1))
    with pytest.raises(ValueError, match="single-sequence prefill"):
        fxpeft.initialize_kv_prefix_from_past_key_values(gm, past_key_values=[(k.expand(2, -1, -1, -1), v)
                                                                              for k, v in legacy])
    with pytest.raises(ValueError, match="Need at least 4 cached tokens, got 3"):
        fxpeft.initialize_kv_prefix_from_past_key_values(gm, past_key_values=[(k[:, :, :3], v) for k, v in legacy])


def test_initialize_prefix_tuning_from_cache_matches_peft():
    model = models.llama().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3))
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    tokenizer = _tokenizer()
    expected = peft.initialize_kv_prefix_from_text(reference, tokenizer, text=TEXT)
    torch.testing.assert_close(fxpeft.initialize_kv_prefix_from_text(gm, tokenizer, text=TEXT), expected, rtol=0,
                               atol=0)
    assert torch.equal(gm.prompt_encoder.default.embedding.weight, reference.prompt_encoder.default.embedding.weight)
    projected = fxpeft.transform(model, fxpeft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True))
    with pytest.raises(ValueError, match="not supported for prefix tuning with `prefix_projection=True`"):
        fxpeft.initialize_kv_prefix_from_text(projected, tokenizer, text=TEXT)
    lora = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="must be a CARTRIDGE or PREFIX_TUNING adapter"):
        fxpeft.initialize_kv_prefix_from_text(lora, tokenizer, text=TEXT)


def test_compose_matches_peft(tmp_path):
    model = models.llama().eval()
    paths = []
    for seed, count in ((1, 3), (2, 2)):
        torch.manual_seed(seed)
        gm = fxpeft.transform(model, fxpeft.CartridgeConfig(task_type="CAUSAL_LM", num_virtual_tokens=count,
                                                            num_frozen_tokens=1))
        paths.append(str(tmp_path / f"part{seed}"))
        fxpeft.save_pretrained(gm, paths[-1])
    peft.compose_cartridge_adapters(paths, output_path=tmp_path / "peft")
    fxpeft.compose_cartridge_adapters(paths, output_path=tmp_path / "fx")
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    table = load_file(tmp_path / "fx" / "adapter_model.safetensors")["prompt_embeddings"]
    assert torch.equal(table, torch.cat([load_file(f"{p}/adapter_model.safetensors")["prompt_embeddings"]
                                         for p in paths]))
    theirs, ours = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("peft", "fx"))
    assert {k: theirs[k] for k in ours if k in theirs} == {k: v for k, v in ours.items() if k in theirs}
    assert (ours["num_virtual_tokens"], ours["num_frozen_tokens"]) == (5, 1)
    composed = fxpeft.from_pretrained(model, str(tmp_path / "fx"))
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    with torch.no_grad():
        torch.testing.assert_close(composed(**inputs).logits, reloaded(**inputs).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Need at least 2 adapters to compose"):
        fxpeft.compose_cartridge_adapters(paths[:1], output_path=tmp_path / "one")
    lora = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    fxpeft.save_pretrained(lora, str(tmp_path / "lora"))
    with pytest.raises(ValueError, match="is not a CARTRIDGE adapter"):
        fxpeft.compose_cartridge_adapters([paths[0], str(tmp_path / "lora")], output_path=tmp_path / "bad")


def test_several_cartridges_switch_like_peft(tmp_path):
    """PEFT's add_adapter / set_adapter with prompt-learning adapters: several loaded, one acting."""
    model, reference, gm = _pair("llama")
    second = dict(task_type="CAUSAL_LM", num_virtual_tokens=2, num_frozen_tokens=0)
    torch.manual_seed(2)
    reference.add_adapter("other", peft.CartridgeConfig(**second))
    torch.manual_seed(2)
    gm.add_adapter("other", fxpeft.CartridgeConfig(**second))
    assert torch.equal(gm.prompt_encoder.other(), reference.prompt_encoder.other.weight)
    assert gm.active_adapters == ["default"]
    inputs = models.hf_inputs("llama", batch=2, seq=7)
    outputs = switched_outputs(reference, gm, inputs, ("default", "other", "default"))
    assert (outputs["default"] - outputs["other"]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="one at a time"):
        gm.set_adapter(["default", "other"])
    with pytest.raises(ValueError, match="only adapter type"):
        gm.add_adapter("lora", fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))

    gm.save_pretrained(str(tmp_path))  # both adapters, the second in its own folder, as PEFT writes them
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    reloaded.load_adapter(str(tmp_path / "other"), "other")
    loaded = fxpeft.from_pretrained(model, str(tmp_path))
    loaded.load_adapter(str(tmp_path / "other"), "other")
    for name in ("other", "default"):
        reloaded.set_adapter(name)
        loaded.set_adapter(name)
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, outputs[name], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(reloaded(**inputs).logits, outputs[name], rtol=1e-5, atol=1e-5)
    loaded.set_adapter("other")
    reloaded.set_adapter("other")
    expected, _ = peft_greedy(reloaded.eval(), inputs["input_ids"], inputs["attention_mask"], 3)
    assert torch.equal(loaded.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0), expected)


def test_bad_input_gets_clear_errors(tmp_path):
    mlp = models.MLP()
    with pytest.raises(ValueError, match="no scaled_dot_product_attention"):
        fxpeft.transform(mlp, fxpeft.CartridgeConfig(num_virtual_tokens=2), example_inputs=(torch.randn(2, 12),))
    assert all(p.requires_grad for p in mlp.parameters())
    model = models.llama()
    with pytest.raises(ValueError, match="CartridgeConfig does not fit this model"):
        fxpeft.transform(model, fxpeft.CartridgeConfig(num_virtual_tokens=2, num_layers=5))
    assert all(p.requires_grad for p in model.parameters())
    gm = fxpeft.transform(model, fxpeft.CartridgeConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="only adapter type"):
        fxpeft.add_adapter(gm, fxpeft.PrefixTuningConfig(num_virtual_tokens=2), "other")
    fxpeft.save_pretrained(gm, str(tmp_path))
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(dict(config, num_virtual_tokens=3)))
    with pytest.raises(ValueError, match=r"has shape \(2, 64\) but the model expects \(3, 64\)"):
        fxpeft.from_pretrained(model, str(tmp_path))
    with pytest.raises(ValueError, match=r"Invalid `prompt_embeddings` shape. Expected \(2, hidden\), got \(3, 64\)"):
        gm.prompt_encoder.default.load_prompt_embeddings(torch.zeros(3, 64))
