"""PEANuT beyond the conformance suite (tests/test_methods.py), against the real PEFT package: deeper
networks (encoder/decoder residual order) and PEFT's draws for the same seed, several adapters merged
against the original weight as PEFT, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

TARGETS = ["fc1", "fc2"]


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def pair(model, **kwargs):
    kwargs = {"r": 3, "target_modules": TARGETS, "init_weights": False, **kwargs}
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PeanutConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.PeanutConfig(**kwargs)).eval()
    return reference, gm


def test_deep_network_equals_peft_with_the_same_seed(tmp_path):
    model = models.MLP().eval()
    reference, gm = pair(model, depth=2, act_fn="silu", scaling=0.3)
    with torch.no_grad():
        expected = reference(x())
        assert (expected - model(x())).abs().max() > 1e-4
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)  # PEFT's draws, no copying
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # …peanut_encoders.1.weight as PEFT
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-5)


def test_two_adapters_merge_against_the_original_weight():
    model = models.MLP().eval()
    reference, gm = pair(model, depth=1)
    torch.manual_seed(1)
    reference.add_adapter("two", peft.PeanutConfig(r=2, target_modules=TARGETS, init_weights=False))
    torch.manual_seed(1)
    gm.add_adapter("two", fxpeft.PeanutConfig(r=2, target_modules=TARGETS, init_weights=False))
    reference.base_model.set_adapter(["default", "two"])
    gm.set_adapter(["default", "two"])
    weight = model.fc2.weight.detach().clone()
    with torch.no_grad():
        unmerged = reference(x())
        torch.testing.assert_close(gm(x()), unmerged, rtol=1e-5, atol=1e-5)
        reference.merge_adapter()
        gm.merge_adapter(["default"])
        gm.merge_adapter(["two"])  # later: still against the weight before the first merge
        torch.testing.assert_close(model.fc2.weight, reference.base_model.model.fc2.base_layer.weight)
        torch.testing.assert_close(gm(x()), unmerged, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        torch.testing.assert_close(model.fc2.weight, weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(layers_pattern="layers"), "layers_to_transform"),
    (dict(r=0), "positive integer"),
    (dict(depth=-1), "non-negative integer"),
    (dict(act_fn="nope"), "Unsupported `act_fn`"),
])
def test_peft_invalid_configs_raise_at_construction(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        peft.PeanutConfig(**kwargs)
    with pytest.raises(ValueError, match=rule):
        fxpeft.PeanutConfig(**kwargs)


def test_conv1d_refused_as_peft_and_no_weighted_adapter():
    conv1d = models.Conv1DNet()
    with pytest.raises(NotImplementedError, match="PEANuT does not support target modules of type"):
        peft.get_peft_model(copy.deepcopy(conv1d), peft.PeanutConfig(target_modules=["c_attn"]))
    with pytest.raises(NotImplementedError, match="PEANuT does not support target modules of type Conv1D"):
        fxpeft.transform(conv1d, fxpeft.PeanutConfig(target_modules=["c_attn"]))
    reference, gm = pair(models.MLP().eval())
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default"], [0.5], "mix")
    with pytest.raises(ValueError, match="PeanutConfig"):
        fxpeft.add_weighted_adapter(gm, ["default"], [0.5], "mix")
