"""What PEFT's linear-site methods MiSS, DeLoRA, GraLoRA and C3A share beyond the conformance suite, against
the real PEFT package: input dropout in training draws as PEFT's, transformers' Conv1D is refused by
the nn.Linear-only ones, and add_weighted_adapter by all (PEFT's tuners have none), leaving the
model's adapters as they were."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models

PAIRS = {"miss": (fxpeft.MissConfig, peft.MissConfig, dict(r=4)),
         "delora": (fxpeft.DeloraConfig, peft.DeloraConfig, dict(r=4)),
         "gralora": (fxpeft.GraloraConfig, peft.GraloraConfig, dict(r=4, gralora_k=1)),
         "c3a": (fxpeft.C3AConfig, peft.C3AConfig, dict(block_size=4))}
LINEAR_ONLY = ["miss", "delora", "c3a"]
# a random start with input dropout (MiSS: r=5 pads fc1's 12 inputs, and PEFT drops out the padded input;
# GraLoRA: one draw for the grid, another for the hybrid LoRA part)
DROPOUT = {"miss": dict(r=5, init_weights=False, miss_dropout=0.5),
           "delora": dict(r=4, init_weights=False, module_dropout=0.5),
           "gralora": dict(r=4, gralora_k=1, hybrid_r=2, init_weights=False, gralora_dropout=0.5)}


@pytest.mark.parametrize("method", list(DROPOUT))
def test_dropout_in_training_draws_as_peft(method):
    fx_type, peft_type, _ = PAIRS[method]
    model = models.MLP()
    reference = peft.get_peft_model(copy.deepcopy(model), peft_type(target_modules=["fc1", "fc2"], **DROPOUT[method]))
    gm = fxpeft.transform(model, fx_type(target_modules=["fc1", "fc2"], **DROPOUT[method]))
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if param.requires_grad:
                ours[name.removeprefix("base_model.model.")].copy_(param)
    x = torch.randn(4, 12)
    reference.train(), gm.train()
    torch.manual_seed(3)
    expected = reference(x)
    torch.manual_seed(3)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)
    assert (gm(x) - expected).abs().max() > 1e-4  # the draws matter: the check above can fail
    reference.eval(), gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", LINEAR_ONLY)
def test_conv1d_layers_are_refused_as_peft(method):
    fx_type, peft_type, options = PAIRS[method]
    with pytest.raises(TypeError, match="only `torch.nn.Linear`"):
        peft.get_peft_model(models.gpt2(), peft_type(target_modules=["c_attn"], **options))
    with pytest.raises(ValueError, match="only `torch.nn.Linear`"):
        fxpeft.transform(models.gpt2(), fx_type(target_modules=["c_attn"], **options))


@pytest.mark.parametrize("method", list(PAIRS))
def test_add_weighted_adapter_is_refused_as_peft_has_none(method):
    fx_type, peft_type, options = PAIRS[method]
    model = models.MLP()
    reference = peft.get_peft_model(copy.deepcopy(model), peft_type(target_modules=["fc1"], **options))
    reference.add_adapter("other", peft_type(target_modules=["fc1"], **options))
    gm = fxpeft.transform(model, fx_type(target_modules=["fc1"], **options))
    gm.add_adapter("other", fx_type(target_modules=["fc1"], **options))
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match=f"combines LoRA or IA3 adapters.*{fx_type.__name__}"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [0.5, 0.5], "mix")
    assert list(gm.peft_config) == ["default", "other"]
