"""GLoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: every path
kind (``lora``, ``vector``, ``constant``, ``none``) on sites with and without a bias, PEFT's draws for the
same seed, several adapters active and merged together (each against the original weight, as PEFT), and
the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors


class BiasFree(nn.Module):
    """fc1 has a bias (C, D, E exist), fc2 has none (they are zeros, as PEFT)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 5, bias=False)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def pair(model, **kwargs):
    """PEFT's and fxpeft's GLoRA models, each made after ``torch.manual_seed(0)``."""
    kwargs = {"r": 2, "target_modules": ["fc1", "fc2"], "init_weights": False, **kwargs}
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.GloraConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.GloraConfig(**kwargs)).eval()
    return reference, gm


@pytest.mark.parametrize("paths", [
    dict(config_A_B="vector", config_C="vector", config_D_E="vector"),
    dict(config_A_B="constant", config_C="none", config_D_E="constant"),
    dict(config_A_B="none", config_C="lora", config_D_E="none"),
])
def test_path_kinds_equal_peft_with_the_same_seed(paths, tmp_path):
    model = BiasFree().eval()
    reference, gm = pair(model, **paths)
    with torch.no_grad():
        base = model(x())
        expected = reference(x())
        assert (expected - base).abs().max() > 1e-4
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)  # PEFT's draws, no copying
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # "none" paths' zeros buffers too
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)


def test_two_active_adapters_add_and_merge_against_the_original_weight():
    model = models.MLP().eval()
    reference, gm = pair(model)
    torch.manual_seed(1)
    reference.add_adapter("two", peft.GloraConfig(r=2, target_modules=["fc1", "fc2"], init_weights=False,
                                                  config_A_B="vector"))
    torch.manual_seed(1)
    gm.add_adapter("two", fxpeft.GloraConfig(r=2, target_modules=["fc1", "fc2"], init_weights=False,
                                             config_A_B="vector"))
    reference.base_model.set_adapter(["default", "two"])
    gm.set_adapter(["default", "two"])
    weight = model.fc1.weight.detach().clone()
    with torch.no_grad():
        expected = reference(x())
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)
        reference.merge_adapter()
        merged = reference(x())
        torch.testing.assert_close(merged, expected, rtol=1e-4, atol=1e-4)  # PEFT merges against W0
        gm.merge_adapter()
        torch.testing.assert_close(gm(x()), merged, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.fc1.weight, reference.base_model.model.fc1.base_layer.weight)
        gm.unmerge_adapter()
        torch.testing.assert_close(model.fc1.weight, weight, rtol=0, atol=1e-6)
        # one adapter merged first, the other later: still both against the original weight
        gm.merge_adapter(["default"])
        gm.merge_adapter(["two"])
        torch.testing.assert_close(gm(x()), merged, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        torch.testing.assert_close(model.fc1.weight, weight, rtol=0, atol=1e-6)


def test_mixed_batch_equals_peft_adapter_names():
    model = models.MLP().eval()
    reference, gm = pair(model)
    reference.add_adapter("two", peft.GloraConfig(r=2, target_modules=["fc1", "fc2"], init_weights=False))
    gm.add_adapter("two", fxpeft.GloraConfig(r=2, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if ".two" in name or "glora" in name:
                p.copy_(reference.get_parameter("base_model.model." + name))
        names = ["two", "default", "__base__", "two"]
        torch.testing.assert_close(gm(x(), adapter_names=names), reference(x(), adapter_names=names),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(config_A_B="full"), "Invalid config_A_B value"),
    (dict(config_C="constant"), "Invalid config_C value"),
    (dict(config_D_E="lora"), "Invalid config_D_E value"),
])
def test_peft_invalid_configs_raise_at_construction(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        peft.GloraConfig(**kwargs)
    with pytest.raises(ValueError, match=rule):
        fxpeft.GloraConfig(**kwargs)


def test_fxpeft_checks_and_refused_layers():
    with pytest.raises(ValueError, match="positive integer"):
        fxpeft.GloraConfig(r=0)
    with pytest.raises(ValueError, match="glora_only"):
        fxpeft.GloraConfig(bias="lora_only")
    conv1d = models.Conv1DNet()
    with pytest.raises(ValueError, match="not a plain torch.nn.Linear"):
        peft.get_peft_model(copy.deepcopy(conv1d), peft.GloraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="Conv1D"):
        fxpeft.transform(conv1d, fxpeft.GloraConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="does not support convolution"):
        fxpeft.transform(models.ConvNet(), fxpeft.GloraConfig(target_modules=["conv1"]))


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm = pair(models.MLP().eval())
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default"], [0.5], "mix")
    with pytest.raises(ValueError, match="GloraConfig"):
        fxpeft.add_weighted_adapter(gm, ["default"], [0.5], "mix")
