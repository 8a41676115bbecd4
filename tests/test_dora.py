"""DoRA beyond the conformance suite (tests/test_methods.py): training with LoRA dropout equals
PEFT's, the eval-mode norm cache, zero-norm features, and bad input."""
from __future__ import annotations

import copy

import peft
import torch
from torch import nn

import fxpeft
import models
from fxpeft.passes import dora

DORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True, init_lora_weights=False)


def _pair(model, **extra):
    config = {**DORA, **extra}
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**config))
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**config))
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if param.requires_grad:
                param.copy_(theirs.pop(name))
    assert not theirs
    return reference, gm


def test_training_with_dropout_equals_peft():
    """With LoRA dropout PEFT applies W to the dropped-out input (not the base output): the same
    masks (one draw per site and adapter, in forward order) give the same losses and gradients."""
    model = models.llama()
    reference, gm = _pair(model, lora_dropout=0.3)
    inputs = models.hf_inputs("llama")
    reference.train()
    gm.train()
    torch.manual_seed(3)
    expected = reference(**inputs, labels=inputs["input_ids"])
    torch.manual_seed(3)
    got = gm(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    expected.loss.backward()
    got.loss.backward()
    grads = {n.removeprefix("base_model.model."): p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, param in gm.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6)
    # the magnitude is trained; the norm is not (detached, as in the paper and PEFT)
    assert all(p.grad is not None for n, p in gm.named_parameters() if n.endswith("lora_magnitude_vector.default.weight"))


def test_eval_norm_is_computed_once_until_a_weight_changes(monkeypatch):
    model = models.llama()
    reference, gm = _pair(model)
    inputs = models.hf_inputs("llama")
    computed = []
    original = dora.norm_of
    monkeypatch.setattr(dora, "norm_of", lambda *a: computed.append(1) or original(*a))
    gm.eval()
    reference.eval()
    sites = 3 * 2  # q_proj, v_proj, down_proj in two layers
    with torch.no_grad():
        gm(**inputs)
        assert len(computed) == sites
        gm(**inputs)
        gm(**inputs)
        assert len(computed) == sites  # reused
        gm.model.layers[0].self_attn.q_proj.lora_B.default.weight.mul_(1.5)  # an in-place update (an optimizer step)
        reference.base_model.model.model.layers[0].self_attn.q_proj.lora_B.default.weight.mul_(1.5)
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert len(computed) == sites + 1  # only the changed site's norm
    gm.train()
    with torch.no_grad():
        gm(**inputs)
    assert len(computed) == 2 * sites + 1  # training recomputes every call, as the weights move


def test_zero_norm_feature_gives_no_nan():
    layer = nn.Sequential(nn.Linear(6, 4))
    with torch.no_grad():
        layer[0].weight[2].zero_()  # with B = 0 at init, this feature's W + s B A has norm 0
    gm = fxpeft.transform(layer, fxpeft.LoraConfig(r=2, target_modules=["0"], use_dora=True)).eval()
    x = torch.randn(3, 6)
    with torch.no_grad():
        out = gm(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, layer(x))  # m = n at init: DoRA starts as the base model
        gm.merge_adapter()
        assert torch.isfinite(layer[0].weight).all()
        torch.testing.assert_close(gm(x), layer(x))
        gm.unmerge_adapter()
        assert torch.isfinite(layer[0].weight).all()


def test_dora_and_lora_adapters_share_a_module():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**{**DORA, "use_dora": False}), adapter_name="plain")
    gm.add_adapter("dora", fxpeft.LoraConfig(**DORA))
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**{**DORA, "use_dora": False}),
                                    adapter_name="plain")
    reference.add_adapter("dora", peft.LoraConfig(**DORA))
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters()}
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".lora_" in name:
                param.copy_(theirs[name])
    inputs = models.hf_inputs("llama")
    reference.eval()
    with torch.no_grad():
        for name in ("plain", "dora"):
            gm.set_adapter(name)
            reference.set_adapter(name)
            torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert "dora" in str(fxpeft.inspect(gm))
