"""SHADOW (ShadowPEFT) against the real PEFT package on tiny Llama, Qwen2, GPT-2 and OPT: the same initial
values from the same seed, outputs, the loss with its shadow term and training steps (dropout included),
checkpoints both ways, generation, sequence classification, several adapters, and what is refused.

PEFT 0.21.2's generate with a KV cache is wrong for SHADOW on transformers 5.24 (its shadow backbone never
sees the cache: the tokens differ from its own use_cache=False ones, asserted below so that a fix is
noticed); the reference for generation is PEFT's generate(use_cache=False), which recomputes every step."""
from __future__ import annotations

import copy
import json
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file
from transformers import DynamicCache, LlamaConfig, LlamaForSequenceClassification

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, seeded_pair

NAMES = ("llama", "qwen2", "gpt2", "opt")
DRAWN = dict(task_type="CAUSAL_LM", init_weights=False)  # W_up drawn: the adapter changes the outputs


def configs(**kwargs):
    values = {**DRAWN, **kwargs}
    return fxpeft.ShadowConfig(**values), peft.ShadowConfig(**values)


def peft_key(key: str) -> str:
    """fxpeft's parameter name for one of PEFT's (its blocks are wrapped; its root modules sit on its tuner)."""
    return key.removeprefix("base_model.model.").replace(".base_layer", "").removeprefix("base_model.")


def trainables(module) -> dict:
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=NAMES)
def pair(request):
    name = request.param
    model = getattr(models, name)().eval()
    reference, gm = seeded_pair(model, *configs())
    return name, model, reference, gm, models.hf_inputs(name)


def test_init_outputs_and_loss_equal_peft(pair):
    name, model, reference, gm, inputs = pair
    theirs, mine = {peft_key(k): p for k, p in trainables(reference).items()}, trainables(gm)
    assert set(mine) == set(theirs)
    for key, value in theirs.items():  # the backbone and every block's modules, drawn in PEFT's order
        assert torch.equal(mine[key], value), key
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    assert set(gm.peft_config["default"].target_modules) == set(reference.peft_config["default"].target_modules)
    labels = models.hf_labels(name, inputs)
    with torch.no_grad():
        expected = reference(**inputs, labels=labels)
        assert (expected.logits - model(**inputs).logits).abs().max() > 1e-2
        got = gm(**inputs, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)  # the task loss + 0.05 × shadow loss
    torch.testing.assert_close(got.shadow_loss, expected.shadow_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.last_shadow_loss, reference.base_model.last_shadow_loss)
    assert got.loss > model(**inputs, labels=labels).loss - 1 and got.shadow_loss.grad_fn is None


def test_training_steps_equal_peft():
    """Train mode (the shadow dropout draws, in PEFT's order) and Adam steps: losses and updated tensors."""
    model = models.llama()
    reference, gm = seeded_pair(model, *configs(auxiliary_loss_weight=0.5))
    reference.train(), gm.train()
    inputs = models.hf_inputs("llama")
    labels = models.hf_labels("llama", inputs)
    theirs, mine = {peft_key(k): p for k, p in trainables(reference).items()}, trainables(gm)
    initial = mine["model.layers.1.shadow_down.default.weight"].detach().clone()
    optimizers = [torch.optim.Adam([group[k] for k in sorted(mine)], lr=1e-2) for group in (theirs, mine)]
    for step in range(3):
        losses = []
        for module, optimizer in zip((reference, gm), optimizers):
            torch.manual_seed(step)
            loss = module(**inputs, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for key in mine:
        torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(mine["model.layers.1.shadow_down.default.weight"], initial)  # (trained: not a no-op)


def test_checkpoints_both_ways(pair, tmp_path):
    name, model, reference, gm, inputs = pair
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    saved = [json.loads((tmp_path / kind / "adapter_config.json").read_text()) for kind in ("peft", "fx")]
    for field in ("peft_type", "r", "shadow_alpha", "shadow_model", "task_type", "auxiliary_loss_weight"):
        assert saved[0][field] == saved[1][field], field
    assert set(saved[0]["target_modules"]) == set(saved[1]["target_modules"])
    with torch.no_grad():
        expected = reference(**inputs).logits
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        loaded = fxpeft.from_pretrained(model, str(tmp_path / "peft")).eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT's default


def test_files_name_the_backbone_default_whatever_the_adapter(tmp_path):
    """PEFT's files hold ``base_model.shadow_backbone.default.…`` for any adapter name; a narrower backbone
    keeps its own embeddings and gets a projection."""
    model = models.llama().eval()
    narrow = dict(shadow_hidden_size=16, shadow_num_attention_heads=2, shadow_intermediate_size=24,
                  shadow_num_hidden_layers=2)
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), configs(**narrow)[1], adapter_name="other").eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, configs(**narrow)[0], adapter_name="other").eval()
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft" / "other", tmp_path / "fx" / "other")
    keys = set(load_file(tmp_path / "fx" / "other" / "adapter_model.safetensors"))
    assert {"base_model.shadow_backbone.default.embed_tokens.weight",
            "base_model.shadow_projection.default.weight"} <= keys
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        expected = reference(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        loaded = fxpeft.from_pretrained(model, str(tmp_path / "peft" / "other"), adapter_name="mine").eval()
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def _generate_kwargs():
    return dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def test_generate_equals_peft_recomputing(pair):
    """Greedy and beam search with the KV cache (the backbone keeps its own beside the model's, reordered
    with the beams) equal PEFT's generate(use_cache=False), left padding included."""
    name, _, reference, gm, inputs = pair
    with torch.no_grad():
        for extra in ({}, {"num_beams": 3, "num_return_sequences": 2}):
            expected = reference.generate(**inputs, use_cache=False, **_generate_kwargs(), **extra)
            assert torch.equal(gm.generate(**inputs, **_generate_kwargs(), **extra), expected), extra
            assert torch.equal(gm.generate(**inputs, use_cache=False, **_generate_kwargs(), **extra), expected)
        if name == "llama":  # PEFT's own cached generate is off (see the module docstring)
            assert not torch.equal(reference.generate(**inputs, **_generate_kwargs()),
                                   reference.generate(**inputs, use_cache=False, **_generate_kwargs()))


def test_a_decoding_loop_with_a_cache_equals_recomputing():
    """A hand-written loop passing the returned cache back: each step's logits equal the whole sequence's; a
    second generate turn over the DynamicCache the first filled equals recomputing."""
    model = models.llama().eval()
    _, gm = seeded_pair(model, *configs())
    ids = models.hf_inputs("llama", batch=1)["input_ids"]
    with torch.no_grad():
        out = gm(input_ids=ids, use_cache=True)
        tokens = ids
        for _ in range(3):
            tokens = torch.cat([tokens, out.logits[:, -1:].argmax(-1)], 1)
            out = gm(input_ids=tokens[:, -1:], cache=out.cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], gm(input_ids=tokens).logits[:, -1], rtol=1e-5, atol=1e-5)
        # multi-turn over a DynamicCache generate returned: the backbone's own cache is kept beside it
        cache = DynamicCache(config=gm.config)
        first = gm.generate(input_ids=ids, cache=cache, **_generate_kwargs())
        turn = torch.cat([first, ids[:, :3]], 1)
        assert torch.equal(gm.generate(input_ids=turn, cache=cache, **_generate_kwargs()),
                           gm.generate(input_ids=turn, use_cache=False, **_generate_kwargs()))
        with pytest.raises(ValueError, match="did not see"):  # a cache made without the shadow backbone
            base_cache = model(input_ids=ids, use_cache=True).past_key_values
            gm(input_ids=tokens[:, -1:], cache=base_cache, use_cache=True)


def test_compiled_generate_and_training_call():
    """Compiled decoding (the backbone runs before each compiled step) and a compiled training call."""
    from transformers import CompileConfig

    model = models.llama().eval()
    reference, gm = seeded_pair(model, *configs())
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        expected = reference.generate(**inputs, use_cache=False, **_generate_kwargs())
        got = gm.generate(**inputs, compile_config=CompileConfig(fullgraph=True), **_generate_kwargs())
    assert torch.equal(got, expected)
    labels = models.hf_labels("llama", inputs)
    compiled = torch.compile(gm, fullgraph=True)
    loss = compiled(**inputs, labels=labels).loss
    torch.testing.assert_close(loss, reference(**inputs, labels=labels).loss, rtol=1e-5, atol=1e-6)
    loss.backward()
    assert gm.shadow_backbone["default"].norm.weight.grad is not None
    # a compiled use_cache=True call gets no cache made for it (none could be read there: the call warns)
    from fxpeft.passes.shadow import NAME, fill_call_inputs
    with torch.no_grad():
        made = fill_call_inputs(gm, "default", (), {"input_ids": inputs["input_ids"], "use_cache": True}, True)
    assert set(made) == {NAME}


def _classifier():
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0)).eval()


def test_sequence_classification_equals_peft(tmp_path):
    """SEQ_CLS: PEFT's trained copy of the classifier (``shadow_head``) and the classifier itself saved; the
    shadow loss on the last real token of s⁰."""
    model = _classifier()
    fx_config, peft_config = configs(task_type="SEQ_CLS")
    reference, gm = seeded_pair(model, fx_config, peft_config)
    inputs = models.hf_inputs("llama")
    labels = torch.tensor([2, 0])
    with torch.no_grad():
        expected = reference(**inputs, labels=labels)
        got = gm(**inputs, labels=labels)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.shadow_loss, expected.shadow_loss, rtol=1e-5, atol=1e-6)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    assert "base_model.shadow_head.default.weight" in load_file(tmp_path / "fx" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="sequence classification"):
        fxpeft.add_adapter(gm, fxpeft.ShadowConfig(task_type="SEQ_CLS"), "second")


def test_options_and_several_adapters():
    """A contiguous subset of blocks; a deeper, narrower backbone without shared embeddings as a second adapter on
    every block; switching, disabling and deleting as in PEFT. PEFT 0.21.2 keeps the first adapter's entry block
    after add_adapter, so its second adapter runs from block 1 there; fxpeft's equals PEFT's model made with that
    adapter alone."""
    model = models.llama().eval()
    with pytest.raises(ValueError):  # PEFT's check: layers_to_transform needs a list of names, not a regex
        fxpeft.ShadowConfig(layers_to_transform=[1], layers_pattern="layers", target_modules=r"model\.layers\.\d+")
    first = configs(target_modules=["model.layers.1"])
    second = configs(shadow_num_hidden_layers=2, shadow_hidden_size=16, shadow_num_attention_heads=2, r=4,
                     update_hidden_size=6, share_embeddings=False, shadow_alpha=0.5)
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), first[1]).eval()
    torch.manual_seed(1)
    reference.add_adapter("second", second[1])
    torch.manual_seed(1)
    alone = peft.get_peft_model(copy.deepcopy(model), second[1]).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, first[0]).eval()
    torch.manual_seed(1)
    fxpeft.add_adapter(gm, second[0], "second")
    assert "default" not in gm.model.layers[0].shadow_down and "default" in gm.model.layers[1].shadow_down
    inputs = models.hf_inputs("llama")
    outputs = {}
    with torch.no_grad():
        for adapter, oracle in (("default", reference), ("second", alone), ("default", reference)):
            reference.set_adapter(adapter), gm.set_adapter(adapter)
            outputs[adapter] = gm(**inputs).logits
            torch.testing.assert_close(outputs[adapter], oracle(**inputs).logits, rtol=1e-5, atol=1e-5)
        reference.set_adapter("second")
        assert (reference(**inputs).logits - outputs["second"]).abs().max() > 1e-3  # PEFT's (see above)
        assert (outputs["default"] - outputs["second"]).abs().max() > 1e-3
        with gm.disable_adapter():
            torch.testing.assert_close(gm(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        with pytest.raises(ValueError, match="one"):
            gm.set_adapter(["default", "second"])
        gm.set_adapter("default")
        gm.delete_adapter("second")
        assert "second" not in gm.shadow_backbone and not any("second" in k for k in gm.state_dict())
        torch.testing.assert_close(gm(**inputs).logits, outputs["default"])


def three_layers():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)).eval()


def test_refusals():
    three = three_layers()
    before = {k: v.clone() for k, v in three.state_dict().items()}
    with pytest.raises(ValueError, match="contiguous"):
        fxpeft.transform(three, fxpeft.ShadowConfig(target_modules=["model.layers.0", "model.layers.2"],
                                                    task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="selects none of them"):  # the layer filter narrows suffix matches
        fxpeft.transform(three, fxpeft.ShadowConfig(target_modules=["layers.0", "layers.1"], layers_to_transform=[1],
                                                    layers_pattern="layers", task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="excludes all of them"):
        fxpeft.transform(three, fxpeft.ShadowConfig(exclude_modules=r".*layers\.\d+", task_type="CAUSAL_LM"))
    assert all(torch.equal(v, before[k]) for k, v in three.state_dict().items())
    model = models.llama().eval()
    with pytest.raises(ValueError, match="whole decoder blocks"):
        fxpeft.transform(model, fxpeft.ShadowConfig(target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with pytest.raises(NotImplementedError, match="encoder-decoder"):
        fxpeft.transform(models.bart(), fxpeft.ShadowConfig(task_type="SEQ_2_SEQ_LM"))
    with pytest.raises(ValueError, match="folder"):
        fxpeft.transform(model, fxpeft.ShadowConfig(shadow_model="someone/some-model", task_type="CAUSAL_LM"))
    with pytest.raises(ValueError, match="positive"):
        fxpeft.ShadowConfig(r=0)
    with pytest.raises(ValueError, match="mirror-only"):
        fxpeft.ShadowConfig(shadow_model="x", shadow_hidden_size=8)
    gm = fxpeft.transform(model, configs()[0]).eval()
    inputs = models.hf_inputs("llama")
    with pytest.raises(Exception, match="merge"):
        gm.merge_adapter()
    with pytest.raises(NotImplementedError, match="Mixed batches"):  # PEFT has no adapter_names for SHADOW either
        gm.generate(**inputs, adapter_names=["default", "__base__"], max_new_tokens=2)
    assert all(not p.requires_grad for n, p in gm.named_parameters() if "shadow" not in n)


def test_a_saved_shadow_backbone_equals_peft(tmp_path):
    """shadow_model naming a folder: a model saved by transformers (its embedding tables frozen, as PEFT), and
    a "projected" shadow checkpoint (a narrower backbone with its trained projection to the model's width)."""
    from safetensors.torch import save_file
    from transformers import AutoModel

    model = models.llama().eval()
    torch.manual_seed(5)
    AutoModel.from_config(copy.deepcopy(model.config)).save_pretrained(tmp_path / "plain")
    narrow = LlamaConfig(vocab_size=models.VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    small = AutoModel.from_config(narrow)
    weights = {f"shadow_model.{k}": v.contiguous() for k, v in small.state_dict().items()}
    save_file({**weights, "shadow_hidden_projection.weight": torch.randn(32, 16)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "causal_lm_with_hidden_projection",
                                                      "shadow_model_config": narrow.to_dict()}))
    inputs = models.hf_inputs("llama")
    for folder in (tmp_path / "plain", tmp_path):
        reference, gm = seeded_pair(model, *configs(shadow_model=str(folder)))
        theirs, mine = {peft_key(k): p for k, p in trainables(reference).items()}, trainables(gm)
        assert set(mine) == set(theirs) and not any("embed_tokens" in k for k in mine)
        assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
        with torch.no_grad():
            torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert ("shadow_projection.default.weight" in mine) == (folder == tmp_path)


def test_a_result_left_as_one_graph(monkeypatch):
    """Where the result does not call its blocks (one graph for the whole model), the blocks are found by their
    module paths in it: outputs and cached generation equal PEFT's; the inspection's whole-model graph shows
    the same rewrite."""
    import fxpeft.module

    model = models.llama().eval()
    monkeypatch.setattr(fxpeft.module, "find_block_paths", lambda tree: [])
    reference, gm = seeded_pair(model, *configs())
    assert not gm._fxpeft_block_paths
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert torch.equal(gm.generate(**inputs, **_generate_kwargs()),
                           reference.generate(**inputs, use_cache=False, **_generate_kwargs()))
    report = fxpeft.inspect(gm)
    assert [(row.path, row.method) for row in report.rows] == [("model.layers.0", "shadow"), ("model.layers.1", "shadow")]
    with pytest.raises(ValueError, match="contiguous"):  # found from the graph, before anything is attached
        fxpeft.transform(three_layers(), fxpeft.ShadowConfig(target_modules=["model.layers.0", "model.layers.2"],
                                                             task_type="CAUSAL_LM"))


def test_unload_shadow_equals_peft():
    """The shadow network alone (PEFT's unload_shadow): logits and greedy tokens; a copy saves whole."""
    model = models.llama().eval()
    reference, gm = seeded_pair(model, *configs())
    inputs = models.hf_inputs("llama")
    theirs, mine = reference.unload_shadow().eval(), gm.unload_shadow().eval()
    with torch.no_grad():
        expected = theirs(**inputs).logits
        torch.testing.assert_close(mine(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert torch.equal(mine.generate(**inputs, **_generate_kwargs()), theirs.generate(**inputs, **_generate_kwargs()))
        copied = gm.unload_shadow(copy=True).eval()
        assert "backbone.embed_tokens.weight" in copied.state_dict()
        torch.testing.assert_close(copied(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="No shadow backbone"):
        gm.unload_shadow("nothing")


def test_decoding_variants_and_caches(tmp_path):
    """Prompt-lookup decoding (its signature's first block returns more than the others), the caches a generate
    call leaves (copied and pickled as plain caches; a copy's shadow cache follows the copy), last_shadow_loss
    per call, and no call's inputs kept alive by the module."""
    import gc
    import pickle
    import weakref

    model = models.llama().eval()
    reference, gm = seeded_pair(model, *configs())
    one = models.hf_inputs("llama", batch=1)
    with torch.no_grad():
        out = gm(input_ids=one["input_ids"], use_cache=True)
        held = weakref.ref(out.cache)
        del out
        gc.collect()
        assert held() is None  # (the capturing call's frames were kept by a stored error, with its cache)
        expected = reference.generate(**one, use_cache=False, **_generate_kwargs())
        assert torch.equal(gm.generate(**one, prompt_lookup_num_tokens=3, **_generate_kwargs()), expected)
        cache = DynamicCache(config=gm.config)
        gm.generate(**one, cache=cache, **_generate_kwargs())
        copied = copy.deepcopy(cache)
        copied.crop(-8)
        assert cache.get_seq_length() == 12 and copied.get_seq_length() == 4
        assert pickle.loads(pickle.dumps(cache)).get_seq_length() == 12
        turn = torch.cat([expected, one["input_ids"][:, :2]], 1)  # the original goes on, its shadow cache whole
        assert torch.equal(gm.generate(input_ids=turn, cache=cache, **_generate_kwargs()),
                           gm.generate(input_ids=turn, use_cache=False, **_generate_kwargs()))
        gm(**one, labels=one["input_ids"])
        assert gm.last_shadow_loss is not None
        gm(**one)
        assert gm.last_shadow_loss is None
    with warnings.catch_warnings(record=True) as caught:  # autograd on: no cache, said once
        warnings.simplefilter("always")
        gm(**one, use_cache=True)
    assert len([w for w in caught if "returns no KV cache" in str(w.message)]) == 1


def test_other_layouts_equal_peft():
    """GPT-NeoX (its body reached through a property: the default targets are the real paths), and
    modules_to_save=["embed_tokens"] (the backbone reads the adapter's copy of the embeddings)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4)).eval()
    inputs = models.hf_inputs("llama")
    for model, extra in ((neox, {}), (models.llama().eval(), {"modules_to_save": ["embed_tokens"]})):
        reference, gm = seeded_pair(model, *configs(**extra))
        assert set(gm.peft_config["default"].target_modules) == set(reference.peft_config["default"].target_modules)
        with torch.no_grad():
            if extra:  # the copies trained: the same change in both
                reference.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(1.5)
                gm.model.embed_tokens.modules_to_save["default"].weight.mul_(1.5)
            torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
