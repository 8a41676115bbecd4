"""torch.compile(fullgraph=True, dynamic=True) on rewritten graphs (slow on CPU: two models only)."""
from __future__ import annotations

import pytest
import torch

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
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
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
    compiled = torch.compile(gm, fullgraph=True, dynamic=True)
    for batch, seq in [(2, 9), (4, 13)]:
        ids = torch.randint(0, models.VOCAB, (batch, seq))
        torch.testing.assert_close(compiled(ids), gm(ids), rtol=1e-5, atol=1e-5)


def test_new_signature_inside_compile_gets_clear_error():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    compiled = torch.compile(gm, fullgraph=True)
    inputs = models.hf_inputs("llama")
    with pytest.raises(Exception, match="Call the module once without torch.compile"):
        compiled(**inputs, labels=inputs["input_ids"])
