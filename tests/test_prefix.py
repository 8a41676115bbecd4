"""Prefix tuning: against PEFT's checkpoints and the method's formula."""
from __future__ import annotations

import contextlib
import copy

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

TASKS = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bert": "SEQ_CLS"}
# PEFT runs prefix tuning through the model's KV cache; transformers 5.24's BertModel takes none, so
# PEFT refuses BERT's forward ("Model does not support past key values"). There the oracle is the
# formula (reference_with_prefixes), which equals what PEFT computed while BERT still took a cache.
PEFT_RUNS = {"llama", "gpt2"}


def _reference(name, **extra):
    model = models.HF_MODELS[name]().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(
        task_type=TASKS[name], num_virtual_tokens=3, **extra)).eval()
    return model, reference


@contextlib.contextmanager
def reference_with_prefixes(table: torch.Tensor, layers: int, heads: int):
    """The prefix-tuning formula at the model's own attention calls: the l-th call of
    F.scaled_dot_product_attention gets slices 2l / 2l+1 of the table (PEFT's layout) as keys / values
    in front of its own, and its mask gets visible columns for them. The positions PEFT's cache
    shifts are the caller's to pass."""
    count = table.shape[0]
    per_layer = table.view(count, layers * 2, heads, -1).permute(1, 2, 0, 3)  # (L·2, heads, n, head_dim)
    original, calls = F.scaled_dot_product_attention, iter(range(layers))

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        assert not is_causal  # an encoder
        layer, batch = next(calls), query.shape[0]
        key = torch.cat([per_layer[2 * layer].expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([per_layer[2 * layer + 1].expand(batch, -1, -1, -1), value], dim=2)
        if attn_mask is not None:
            visible = torch.ones if attn_mask.dtype == torch.bool else torch.zeros
            attn_mask = torch.cat([visible(*attn_mask.shape[:-1], count, dtype=attn_mask.dtype), attn_mask], -1)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _formula_outputs(name, model, gm, inputs, labels):
    """What prefix tuning computes, with the base model and the formula (see PEFT_RUNS)."""
    count = gm.peft_config["default"].num_virtual_tokens
    seq = inputs["input_ids"].shape[1]
    positions = inputs.get("position_ids", torch.arange(seq).expand(inputs["input_ids"].shape[0], -1)) + count
    config = model.config
    with reference_with_prefixes(gm.prompt_encoder.default(), config.num_hidden_layers, config.num_attention_heads):
        return model(**dict(inputs, position_ids=positions), labels=labels)


@pytest.mark.parametrize("name", list(TASKS))
def test_peft_checkpoint_loads_with_equal_outputs_and_losses(name, tmp_path):
    model, reference = _reference(name)
    reference.save_pretrained(tmp_path / "peft")  # PEFT writes BERT's checkpoint, though it cannot run it
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"))
    full = models.hf_inputs(name, batch=2, seq=7)  # left padding on the first row
    with_positions = dict(full, position_ids=(full["attention_mask"].cumsum(-1) - 1).clamp(min=0))  # PEFT adds n
    for inputs in (full, {"input_ids": full["input_ids"][:, :5]}, with_positions):  # with and without a mask
        labels = models.hf_labels(name, inputs)
        with torch.no_grad():
            got = gm(**inputs, labels=labels)
            if name in PEFT_RUNS:
                expected = reference(**inputs, labels=labels)
            else:
                expected = _formula_outputs(name, model, gm, inputs, labels)
            base = model(**inputs).logits
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
        assert (got.logits - base).abs().max() > 1e-3  # the prefixes act

    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")


def test_peft_cannot_run_bert_prefix_tuning_on_these_versions():
    """Why BERT's oracle is the formula: if PEFT runs it again, test against PEFT instead."""
    _, reference = _reference("bert")
    with pytest.raises(ValueError, match="does not support past key values"):
        reference(**models.hf_inputs("bert"))


def test_projected_gqa_prefixes_train_like_peft_and_save_for_peft(tmp_path):
    model, reference = _reference("llama", prefix_projection=True, encoder_hidden_size=16)
    config = fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                       encoder_hidden_size=16)
    gm = fxpeft.transform(model, config)
    stored = gm.peft_config["default"]  # llama: 4 query heads, 2 key/value heads of size 8 (read from the graph)
    assert (stored.num_layers, stored.num_attention_heads, stored.token_dim) == (2, 2, 16)
    assert (stored.num_layers, stored.num_attention_heads, stored.token_dim) == (
        reference.peft_config["default"].num_layers, reference.peft_config["default"].num_attention_heads,
        reference.peft_config["default"].token_dim)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    assert {row.path for row in fxpeft.inspect(gm).rows} == {f"model.layers.{i}.self_attn" for i in range(2)}
    with torch.no_grad():
        for param in reference.prompt_encoder.parameters():
            param.normal_(std=0.5)
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    gm.eval()
    inputs = models.hf_inputs("llama", batch=3, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)

    fxpeft.save_pretrained(gm, str(tmp_path))
    assert load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"].shape == (3, 2 * 2 * 16)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)


def _decoder_with_prefixes(model, prefixes, ids, count):
    """TinyDecoder's forward written out with a key/value prefix at each attention (the formula)."""
    x = model.embed(ids)
    layers = prefixes.view(count, len(model.blocks) * 2, 4, 8).permute(1, 2, 0, 3)  # (L·2, heads, n, head_dim)
    for index, block in enumerate(model.blocks):
        b, s, d = x.shape
        q, k, v = block.qkv(block.norm1(x)).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, s, 4, 8).transpose(1, 2) for t in (q, k, v))
        k = torch.cat([layers[2 * index].expand(b, -1, -1, -1), k], dim=2)
        v = torch.cat([layers[2 * index + 1].expand(b, -1, -1, -1), v], dim=2)
        visible = torch.cat([torch.ones(s, count, dtype=torch.bool), torch.ones(s, s, dtype=torch.bool).tril()], 1)
        attention = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        x = x + block.proj(attention.transpose(1, 2).reshape(b, s, d))
        x = x + block.down(F.gelu(block.up(block.norm2(x))))
    return model.lm_head(model.norm(x))


def test_custom_decoder_formula_causality_and_training():
    model = models.TinyDecoder().eval()
    ids = torch.randint(0, models.VOCAB, (2, 9))
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(num_virtual_tokens=4), example_inputs=(ids,))
    stored = gm.peft_config["default"]
    assert (stored.num_layers, stored.num_attention_heads, stored.token_dim) == (2, 4, 32)  # read from the graph
    out = gm(ids)
    assert out.shape == ids.shape + (models.VOCAB,)
    torch.testing.assert_close(out, _decoder_with_prefixes(model, gm.prompt_encoder.default(), ids, 4))
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % models.VOCAB
    later = gm(changed)
    torch.testing.assert_close(later[:, :-1], out[:, :-1], rtol=0, atol=0)  # is_causal stays causal
    assert (later[:, -1] - out[:, -1]).abs().max() > 1e-4
    other = torch.randint(0, models.VOCAB, (3, 5))
    torch.testing.assert_close(gm(other), _decoder_with_prefixes(model, gm.prompt_encoder.default(), other, 4))

    gm.train()
    gm(ids).logsumexp(-1).mean().backward()
    trained = {n for n, p in gm.named_parameters() if p.grad is not None}
    assert trained == {"prompt_encoder.default.embedding.weight"}


class ScaledInputDecoder(torch.nn.Module):
    """Attention over its input times two: nothing tells what the input's shape should be."""

    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x * 2).chunk(3, -1)
        q, k, v = q.unflatten(-1, (2, 4)).transpose(1, 2), k.unflatten(-1, (2, 4)).transpose(1, 2), \
            v.unflatten(-1, (2, 4)).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v)


def test_custom_decoder_needs_no_example_inputs():
    """A symbolic trace has no shapes; fxpeft gets them from one run on fake tensors, with token ids
    guessed for the input that feeds the embedding."""
    model = models.TinyDecoder().eval()
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(num_virtual_tokens=3))
    stored = gm.peft_config["default"]
    assert (stored.num_layers, stored.num_attention_heads, stored.token_dim) == (2, 4, 32)
    ids = torch.randint(0, models.VOCAB, (3, 7))
    torch.testing.assert_close(gm(ids), _decoder_with_prefixes(model, gm.prompt_encoder.default(), ids, 3))


def test_zero_init_leaves_real_tokens_attending_to_zero_values():
    model = models.TinyDecoder().eval()
    ids = torch.randint(0, models.VOCAB, (2, 6))
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(num_virtual_tokens=2, init_weights="zero"),
                          example_inputs=(ids,))
    assert not gm.prompt_encoder.default.embedding.weight.any()
    torch.testing.assert_close(gm(ids), _decoder_with_prefixes(model, torch.zeros(2, 2 * 2 * 32), ids, 2))


def test_opt_positions_from_the_mask_match_peft():
    """OPT derives positions from the mask: PEFT's mask with n ones in front moves real tokens by n
    and leaves left padding where it was."""
    model = models.opt().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)).eval()
    inputs = models.hf_inputs("opt", batch=2, seq=7)  # left padding on the first row
    with torch.no_grad():
        gm.prompt_encoder.default.embedding.weight.copy_(reference.prompt_encoder.default.embedding.weight)
        got, expected = gm(**inputs).logits, reference(**inputs).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - model(**inputs).logits).abs().max() > 1e-3  # the prefixes act


def test_bad_input_gets_clear_errors():
    with pytest.raises(ValueError, match="num_virtual_tokens must be a positive integer"):
        fxpeft.PrefixTuningConfig(num_virtual_tokens=0)
    mlp = models.MLP()
    with pytest.raises(ValueError, match="no scaled_dot_product_attention"):
        fxpeft.transform(mlp, fxpeft.PrefixTuningConfig(num_virtual_tokens=2), example_inputs=(torch.randn(2, 12),))
    assert all(p.requires_grad for p in mlp.parameters())
    with pytest.raises(ValueError, match="pass example_inputs"):  # an input fxpeft cannot guess: scaled first
        fxpeft.transform(ScaledInputDecoder(), fxpeft.PrefixTuningConfig(num_virtual_tokens=2))
    with pytest.raises(ValueError, match="does not fit this model"):
        fxpeft.transform(models.llama(), fxpeft.PrefixTuningConfig(num_virtual_tokens=2, num_layers=5))

    t5 = models.t5(layers=1)  # one layer: each of these captures the model before it fails
    with pytest.raises(ValueError, match=r"does not fit this model.*num_layers=\(5, 1\), num_transformer_submodules="
                                         r"\(1, 2\)"):  # a decoder-only layout
        fxpeft.transform(t5, fxpeft.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM", num_layers=5,
                                                       num_transformer_submodules=1))
    with pytest.raises(NotImplementedError, match="needs task_type='SEQ_2_SEQ_LM'"):
        fxpeft.transform(t5, fxpeft.PrefixTuningConfig(num_virtual_tokens=2, task_type="FEATURE_EXTRACTION"))
    deeper_decoder = models.t5()
    deeper_decoder.config.num_layers = 1  # PEFT sizes the table by config.num_layers: 1 layer for 2 decoder layers
    with pytest.raises(ValueError, match="decoder has 2 self-attentions"):
        fxpeft.transform(deeper_decoder, fxpeft.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    eager = models.t5(layers=1)
    eager.set_attn_implementation("eager")  # attention written out as matmul + softmax
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        fxpeft.transform(eager, fxpeft.PrefixTuningConfig(num_virtual_tokens=2, task_type="SEQ_2_SEQ_LM"))
    assert all(p.requires_grad for model in (t5, deeper_decoder, eager) for p in model.parameters())


def test_compiled_prefix_decoder_matches_eager_across_shapes():
    torch._dynamo.reset()
    model = models.TinyDecoder().eval()
    ids = torch.randint(0, models.VOCAB, (2, 9))
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                           encoder_hidden_size=8), example_inputs=(ids,))
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=models.COMPILE_BACKEND)
    for batch, seq in [(2, 9), (4, 13)]:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        torch.testing.assert_close(compiled(ids), gm(ids), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- encoder-decoder models

SEQ2SEQ = {"t5": models.t5, "bart": models.bart}


def _seq2seq_calls():
    """How seq2seq models get called: with padded encoder and decoder masks, with no mask, with the
    decoder inputs made from the labels."""
    inputs = models.hf_inputs("t5", batch=2, seq=7)
    inputs["attention_mask"][0, :2] = 0
    labels = models.hf_labels("t5", inputs)
    decoder_mask = torch.ones_like(inputs["decoder_input_ids"])
    decoder_mask[0, -2:] = 0
    return [dict(inputs, decoder_attention_mask=decoder_mask, labels=labels),
            {"input_ids": inputs["input_ids"], "decoder_input_ids": inputs["decoder_input_ids"], "labels": labels},
            {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}]


def _seq2seq_reference(model, **extra):
    return peft.get_peft_model(copy.deepcopy(model), peft.PrefixTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **extra))


@pytest.mark.parametrize("name,count,self_attention", [  # each call signature costs an export: BART's one call
    ("t5", 3, "decoder.block.{}.layer.0.SelfAttention"), ("bart", 1, "model.decoder.layers.{}.self_attn")])
def test_seq2seq_peft_checkpoint_loads_with_equal_outputs_and_saves_back(name, count, self_attention, tmp_path):
    model = SEQ2SEQ[name]().eval()
    reference = _seq2seq_reference(model).eval()
    reference.save_pretrained(tmp_path / "peft")
    calls = _seq2seq_calls()[:count]
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"), example_inputs=calls[0])  # saves one capture
    stored, theirs = gm.peft_config["default"], reference.peft_config["default"]
    assert (stored.num_layers, stored.num_transformer_submodules, stored.num_attention_heads, stored.token_dim) == (
        theirs.num_layers, theirs.num_transformer_submodules, theirs.num_attention_heads, theirs.token_dim)
    # only the decoder's self-attentions take prefixes: not the encoder's, not cross-attention
    assert {row.path for row in fxpeft.inspect(gm).rows} == {self_attention.format(i) for i in range(2)}
    for call in calls:
        with torch.no_grad():
            expected, got = reference(**call), gm(**call)
        torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (gm(**call).logits - model(**call).logits).abs().max() > 1e-3  # the prefixes act

    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    # PEFT saves one prefix table row per virtual token, (n, num_layers·2·token_dim)
    saved = load_file(tmp_path / "fx" / "adapter_model.safetensors")["prompt_embeddings"]
    assert saved.shape == (3, theirs.num_layers * 2 * theirs.token_dim)


def test_t5_projected_prefixes_train_like_peft_and_save_for_peft(tmp_path):
    """Three layers: PEFT deals a seq2seq table's slices out as 4l, 4l+1 (mod 6), not 2l, 2l+1."""
    model = models.t5(layers=3).eval()
    extra = {"prefix_projection": True, "encoder_hidden_size": 16}
    reference = _seq2seq_reference(model, **extra).eval()
    call = _seq2seq_calls()[0]
    gm = fxpeft.transform(model, fxpeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3, **extra),
                          example_inputs=call)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    with torch.no_grad():
        for param in reference.prompt_encoder.parameters():
            param.normal_(std=0.5)
    gm.prompt_encoder.load_state_dict(reference.prompt_encoder.state_dict())
    gm.eval()
    ours, theirs = gm(**call), reference(**call)
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-5)
    ours.loss.backward()
    theirs.loss.backward()
    expected_grads = dict(reference.prompt_encoder.default.named_parameters())
    for name, param in gm.prompt_encoder.default.named_parameters():
        torch.testing.assert_close(param.grad, expected_grads[name].grad, rtol=1e-4, atol=1e-6)

    fxpeft.save_pretrained(gm, str(tmp_path))  # the projected table, which PEFT loads for inference
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**call).logits, gm(**call).logits, rtol=1e-5, atol=1e-5)


def test_compiled_prefix_t5_matches_eager_across_shapes():
    torch._dynamo.reset()
    gm = fxpeft.transform(models.t5().eval(), fxpeft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM",
                                                                       num_virtual_tokens=3)).eval()
    # no gradients: dynamo's capture and shape guards are the check (the decoder-only test above runs aot_eager)
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend="eager")
    with torch.no_grad():
        for batch, seq in [(2, 7), (3, 11)]:
            inputs = models.hf_inputs("t5", batch=batch, seq=seq)
            torch.testing.assert_close(compiled(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
