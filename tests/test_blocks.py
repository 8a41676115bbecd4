"""Block structure: the model's repeated blocks are modules of the result, each running a graph (per-model
checks of block paths, keys and hooks are in test_core.py, on its shared transformed models)."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from fxpeft.blocks import Block, blocks_of
from peft_oracle import copy_adapter_weights

def test_blocks_of_one_structure_share_one_lowering():
    gm = fxpeft.transform(models.t5(layers=3), fxpeft.LoraConfig(r=2, target_modules=["q", "v"]))
    code = {path: tuple(block.variants.values())[0][0] for path, block in blocks_of(gm).items()}
    # block 0 of each stack holds the relative position bias: a structure of its own
    assert code["encoder.block.1"] is code["encoder.block.2"]
    assert code["decoder.block.1"] is code["decoder.block.2"]
    assert code["encoder.block.0"] is not code["encoder.block.1"]


def test_custom_model_blocks_and_flat_results():
    decoder = fxpeft.transform(models.TinyDecoder(), fxpeft.LoraConfig(r=2, target_modules=["qkv"]))
    assert sorted(blocks_of(decoder)) == ["blocks.0", "blocks.1"]
    assert all(isinstance(decoder.get_submodule(p), Block) for p in ("blocks.0", "blocks.1"))
    mlp = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    prefix = fxpeft.transform(models.llama(), fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    for flat in (mlp, prefix):  # no repeated blocks; prefix tuning deals one prefix per attention over the whole graph
        assert not blocks_of(flat)
        with pytest.raises(NotImplementedError, match="found none in this model"):
            flat.gradient_checkpointing_enable()


def _saved_activation_bytes(module, inputs):
    """Bytes of the activations autograd keeps for backward (parameters excluded, storages counted once)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return sum(seen.values())


def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients_and_less_memory_than_peft():
    model = models.llama()
    config = dict(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0.1)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config)).train()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).train()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    inputs = models.hf_inputs("llama", batch=4, seq=32)

    torch.manual_seed(1)
    plain = _saved_activation_bytes(gm, inputs)
    grads = {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}
    gm.zero_grad()
    gm.gradient_checkpointing_enable()
    assert gm.is_gradient_checkpointing
    torch.manual_seed(1)  # dropout draws the same masks, in the forward and in the recompute
    checkpointed = _saved_activation_bytes(gm, inputs)
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-6, atol=1e-6)
    theirs = _saved_activation_bytes(reference, inputs)
    assert checkpointed < plain / 2
    assert checkpointed <= theirs, (checkpointed, theirs)

    gm.gradient_checkpointing_disable()
    gm.zero_grad()
    assert _saved_activation_bytes(gm, inputs) == plain


def _adapter_grads(gm, inputs, run=None):
    gm.zero_grad()
    (gm if run is None else run)(**inputs, labels=inputs["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in gm.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("variant", ["qlora", "two_adapters", "compiled"])
def test_gradient_checkpointing_composes_with_qlora_several_adapters_and_compile(variant):
    lora = fxpeft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)
    configs = [fxpeft.BnbConfig(load_in_4bit=True), lora] if variant == "qlora" else lora
    gm = fxpeft.transform(models.llama(), configs).train()
    if variant == "two_adapters":
        gm.add_adapter("other", fxpeft.LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
        gm.set_adapter(["default", "other"])
    inputs = models.hf_inputs("llama")
    expected = _adapter_grads(gm, inputs)
    gm.gradient_checkpointing_enable()
    run = gm
    if variant == "compiled":
        torch._dynamo.reset()
        from torch._dynamo.testing import CompileCounter
        run = torch.compile(gm, backend=CompileCounter(), fullgraph=True)
    got = _adapter_grads(gm, inputs, run)
    assert set(got) == set(expected) and (variant != "two_adapters" or any(".other." in n for n in got))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


def _exported_block_counts(monkeypatch):
    """How many decoder layers each torch.export in fxpeft saw."""
    from fxpeft import capture

    seen, original = [], capture.export_call

    def spy(model, kwargs, widen=False):
        seen.append(len(model.get_submodule("model.layers")))
        return original(model, kwargs, widen)

    monkeypatch.setattr(capture, "export_call", spy)
    return seen


def test_deep_models_capture_two_blocks_and_equal_peft(monkeypatch, tmp_path):
    """Five alike layers: exported with two, the rest called like the second; everything PEFT-equal."""
    from transformers import LlamaConfig, LlamaForCausalLM

    seen = _exported_block_counts(monkeypatch)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2)).eval()
    config = dict(r=2, target_modules="all-linear", init_lora_weights=False)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config)).eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).eval()
    assert copy_adapter_weights(reference, gm) == 5 * 7 * 2
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        labelled = dict(inputs, labels=inputs["input_ids"])  # a second signature, captured the same way
        torch.testing.assert_close(gm(**labelled).loss, reference(**labelled).loss, rtol=1e-5, atol=1e-5)
    assert seen == [2, 2]
    assert len(fxpeft.inspect(gm).rows) == 5 * 7
    merged = fxpeft.merge_and_unload(gm)
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, reference.merge_and_unload()(**inputs).logits,
                                   rtol=1e-4, atol=1e-5)


def test_layers_that_differ_by_config_are_all_captured(monkeypatch):
    """Qwen2 with sliding-window and full-attention layers: the code between the layers picks each
    layer's mask by its index, which two layers cannot show, so the whole model is exported."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    seen = _exported_block_counts(monkeypatch)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=models.VOCAB, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         use_sliding_window=True, sliding_window=3, layer_types=types)).eval()
    config = dict(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config)).eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config)).eval()
    copy_adapter_weights(reference, gm)
    assert seen == [4]
    inputs = models.hf_inputs("llama", seq=9)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_a_whole_graph_method_cannot_be_added_to_a_block_structured_module():
    gm = fxpeft.transform(models.llama(), fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="pass the config to fxpeft.transform"):
        gm.add_adapter("prefix", fxpeft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert list(gm.peft_config) == ["default"]
