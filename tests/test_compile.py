"""torch.compile(fullgraph=True, dynamic=True) on rewritten graphs (slow on CPU: two models only)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import fxpeft
import models


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_llama_matches_eager_across_shapes_and_trains():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend=models.COMPILE_BACKEND)
    with torch.no_grad():
        for batch, seq in [(2, 10), (3, 17)]:
            inputs = models.hf_inputs("llama", batch=batch, seq=seq)
            torch.testing.assert_close(compiled(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)
    gm.train()
    inputs = models.hf_inputs("llama", batch=2, seq=8)
    eager_loss = gm(**inputs, labels=inputs["input_ids"]).loss  # first call with labels captures its graph
    eager_loss.backward()
    eager_grad = gm.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad.clone()
    gm.zero_grad()
    loss = compiled(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(gm.model.layers[0].self_attn.q_proj.lora_B.default.weight.grad, eager_grad)


def test_compiled_custom_decoder_across_shapes():
    model = models.TinyDecoder().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["qkv", "proj", "embed"], init_lora_weights=False))
    # dynamo and AOT autograd with dynamic shapes; inductor's code runs in the trained-llama test below (30 s
    # here on 2 cores, most of this file's time)
    compiled = torch.compile(gm, fullgraph=True, dynamic=True, backend="aot_eager")
    for batch, seq in [(2, 9), (4, 13)]:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        torch.testing.assert_close(compiled(ids), gm(ids), rtol=1e-5, atol=1e-5)


def _compiled_run(module, calls):
    """Compile ``module`` before its first call, run ``calls`` ((mode, inputs) pairs), and return the
    losses / logits and how many graphs dynamo compiled (recompiles and graph breaks included; the
    counting backend runs them eagerly, which keeps this test fast)."""
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(module, dynamic=True, backend=counter)
    results = []
    for mode, inputs in calls:
        module.train(mode == "train")
        out = compiled(**inputs)
        results.append(out.loss if "labels" in inputs else out.logits)
    return results, counter.frame_count


def test_first_call_compiled_with_labels_trains_evaluates_and_recompiles_no_more_than_peft():
    """torch.compile(gm) before any eager call, with labels, in train then eval mode, two lengths."""
    from peft_oracle import peft_model

    model = models.llama()
    config = dict(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))
    reference = peft_model(model, **config)
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.requires_grad:
                gm.get_parameter(name.removeprefix("base_model.model.")).copy_(param)
    calls = []
    for seq in (8, 11):
        inputs = models.hf_inputs("llama", batch=2, seq=seq)
        calls.append(("train", dict(inputs, labels=inputs["input_ids"])))
    calls += [("eval", models.hf_inputs("llama", batch=2, seq=seq)) for seq in (8, 11)]
    ours, our_frames = _compiled_run(gm, calls)
    theirs, their_frames = _compiled_run(reference, calls)
    for got, expected in zip(ours, theirs):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    ours[0].backward()
    assert gm.model.layers[0].self_attn.q_proj.lora_A.default.weight.grad is not None
    assert our_frames <= their_frames, (our_frames, their_frames)


def test_new_signature_inside_a_compiled_function_gets_clear_error():
    """Only a compiled *function* that calls the module cannot capture: the message says what to do."""
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    step = torch.compile(lambda batch: gm(**batch, labels=batch["input_ids"]).loss, fullgraph=True)
    with pytest.raises(Exception, match="call the module once with these arguments before compiling"):
        step(models.hf_inputs("llama"))


def test_regional_compilation_compiles_each_block_structure_once():
    gm = fxpeft.transform(models.llama(), fxpeft.LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False)).eval()
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        expected = gm(**inputs).logits
        counter = CompileCounter()
        assert fxpeft.compile_blocks(gm, backend=counter, dynamic=True) == ["model.layers.0", "model.layers.1"]
        torch.testing.assert_close(gm(**inputs).logits, expected)
        gm(**models.hf_inputs("llama", seq=11))
    assert counter.frame_count == 1  # one structure, no grad: one graph for every block and length
    with pytest.raises(ValueError, match="use torch.compile"):
        fxpeft.compile_blocks(fxpeft.transform(models.MLP(), fxpeft.LoraConfig(target_modules=["fc1"])))
