"""C3A beyond the conformance suite (tests/test_methods.py), against the real PEFT package and the
written formula: PEFT's init draws and block_size_pattern, the circulant ΔW, float32 kernels on a
bfloat16 base, several active adapters, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models


def pair(model=None, **kwargs):
    model = (model or models.MLP()).eval()
    kwargs = {"block_size": 4, "target_modules": ["fc1"], **kwargs}
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.C3AConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.C3AConfig(**kwargs)).eval()
    return reference, gm, model


@pytest.mark.parametrize("init", ["xavier_uniform", False, "kaiming_uniform", "gaussian"])
def test_init_draws_and_block_size_pattern_are_peft(init):
    reference, gm, _ = pair(init_weights=init, target_modules=["fc1", "fc2"], block_size_pattern={"fc2": 1})
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "c3a_" in n}
    ours = {n: p for n, p in gm.named_parameters() if "c3a_" in n}
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    assert ours["fc1.c3a_kernel.default"].shape == (6, 3, 4) and ours["fc2.c3a_kernel.default"].shape == (5, 24, 1)
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_delta_weight_is_the_circulant_formula_and_peft():
    """Block (j, k) of ΔW is w_jk[(t - i) mod b] / in at row i, column t; merging adds PEFT's ΔW."""
    reference, gm, model = pair(init_weights="gaussian")
    kernel = gm.fc1.c3a_kernel["default"].detach()
    expected = torch.zeros(24, 12)
    for j in range(6):
        for k in range(3):
            for i in range(4):
                for t in range(4):
                    expected[4 * j + i, 4 * k + t] = kernel[j, k, (t - i) % 4] / 12
    weight = model.fc1.weight.clone()
    with torch.no_grad():
        gm.merge_adapter()
    torch.testing.assert_close(model.fc1.weight - weight, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reference.base_model.model.fc1.get_delta_weight("default"), expected,
                               rtol=1e-5, atol=1e-6)


def test_kernels_stay_float32_on_a_bfloat16_base():
    """PEFT computes C3A in float32 whatever the base dtype (its FFTs take no half types on CPU)."""
    reference, gm, _ = pair(models.MLP().to(torch.bfloat16), init_weights="gaussian")
    assert gm.fc1.c3a_kernel["default"].dtype == torch.float32
    x = torch.randn(3, 12, dtype=torch.bfloat16)
    with torch.no_grad():
        got, expected = gm(x), reference(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_several_active_adapters_add_up():
    """Each active adapter convolves the site's input and the deltas add, as merging both does (PEFT's
    forward feeds the second adapter the first one's output instead: checked, so a fixed PEFT shows)."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    reference, gm, _ = pair(model, init_weights="gaussian", target_modules=["0"])
    for target in (gm, reference):
        target.add_adapter("other", (fxpeft if target is gm else peft).C3AConfig(
            block_size=4, target_modules=["0"], init_weights="gaussian"))
    with torch.no_grad():
        gm.get_submodule("0").c3a_kernel["other"].copy_(reference.base_model.model[0].c3a_kernel["other"])
        x = torch.randn(3, 8)
        gm.set_adapter(["default", "other"])
        reference.base_model.set_adapter(["default", "other"])
        base = model[0](x)
        deltas = [reference.base_model.model[0].get_delta_weight(a) for a in ("default", "other")]
        expected = base + x @ (deltas[0] + deltas[1]).T
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
        assert (reference(x) - expected).abs().max() > 1e-3
        gm.merge_adapter()
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, named", [(dict(target_modules="fc.*", layers_to_transform=[0]), "layers_to_transform"),
                                           (dict(target_modules="fc.*", layers_pattern="h"), "layers_pattern")])
def test_bad_configs_raise_at_construction_as_peft(kwargs, named):
    for config_type in (peft.C3AConfig, fxpeft.C3AConfig):
        with pytest.raises(ValueError, match=named):
            config_type(**kwargs)


@pytest.mark.parametrize("kwargs, named", [(dict(block_size=0), "positive integer"),
                                           (dict(block_size_pattern={"fc1": -4}), "positive integer"),
                                           (dict(init_weights="normal"), "Unknown init_weights"),
                                           (dict(bias="lora_only"), "bias")])
def test_what_peft_refuses_late_raises_at_construction(kwargs, named):
    kwargs = {"block_size": 4, **kwargs}
    with pytest.raises(ValueError, match=named):
        fxpeft.C3AConfig(target_modules=["fc1"], **kwargs)
    if "bias" not in kwargs:  # PEFT: when it builds the layer
        with pytest.raises(ValueError, match=named):
            peft.get_peft_model(models.MLP(), peft.C3AConfig(target_modules=["fc1"], **kwargs))


@pytest.mark.parametrize("target, named", [("fc1", "factor of the input size"), ("fc2", "factor of the output size")])
def test_block_sizes_that_do_not_divide_raise_and_leave_the_model_alone(target, named):
    model = models.MLP()  # fc1: 12 -> 24 (5 divides neither), fc2: 24 -> 5 (3 divides 24, not 5)
    size = 5 if target == "fc1" else 3
    weights = {key: v.clone() for key, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        peft.get_peft_model(copy.deepcopy(model), peft.C3AConfig(block_size=size, target_modules=[target]))
    with pytest.raises(ValueError, match=named):
        fxpeft.transform(model, fxpeft.C3AConfig(block_size=size, target_modules=[target]))
    assert all(torch.equal(v, weights[key]) for key, v in model.state_dict().items())
