"""WaveFT beyond the conformance suite (tests/test_methods.py), against the real PEFT package: the
wavelet families (their padding and crop on odd and even sizes), use_idwt=False, the per-layer
n_frequency options, PEFT's initial draws, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_half_precision_like_peft, assert_no_weighted_adapter, seeded_pair

TARGETS = ["fc1", "fc2"]


def pair(seed: int = 0, **kwargs):
    model = models.MLP().eval()
    kwargs = {"target_modules": TARGETS, "n_frequency": 40, "init_weights": False, **kwargs}
    return (*seeded_pair(model, fxpeft.WaveFTConfig(**kwargs), peft.WaveFTConfig(**kwargs), seed), model)


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kwargs", [
    dict(wavelet_family="db2"), dict(wavelet_family="db5"), dict(wavelet_family="sym3"),
    dict(wavelet_family="coif1"), dict(wavelet_family="coif2", scaling=3.0), dict(use_idwt=False),
    dict(proportional_parameters=True), dict(n_frequency_pattern={"fc2": 7}),
])
def test_equals_peft_without_copying(kwargs):
    """Same seed, same draws and locations: the outputs and merged weights equal PEFT's."""
    reference, gm, model = pair(**kwargs)
    ours = {n: p for n, p in gm.named_parameters() if "waveft_" in n}
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "waveft_" in n}
    assert {n: p.shape for n, p in ours.items()} == {n: p.shape for n, p in theirs.items()}
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    for name in TARGETS:
        assert torch.equal(gm.get_submodule(name).waveft_gate["default"].indices,
                           reference.base_model.model.get_submodule(name).waveft_indices["default"])
    with torch.no_grad():
        expected = reference(x())
        assert (expected - model(x())).abs().max() > 1e-4
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-6)
        gm.merge_adapter()
        reference.merge_adapter()
        for name in TARGETS:
            torch.testing.assert_close(gm.get_submodule(name).weight,
                                       reference.base_model.model.get_submodule(name).base_layer.weight)


def test_proportional_shares_follow_layer_sizes():
    reference, gm, _ = pair(proportional_parameters=True, n_frequency=30)
    # 60 in all, split by out·in: fc1 24·12 = 288, fc2 5·24 = 120
    assert gm.fc1.waveft_spectrum["default"].numel() == round(288 / 408 * 60)
    assert gm.fc2.waveft_spectrum["default"].numel() == round(120 / 408 * 60)


@pytest.mark.parametrize("kwargs, message", [
    (dict(wavelet_family="haar"), "Wavelet family haar not supported"),
    (dict(target_modules="fc.*", layers_to_transform=[0]), "`layers_to_transform` cannot be used"),
    (dict(target_modules="fc.*", layers_pattern="layers"), "`layers_pattern` cannot be used"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_invalid_configs_raise_as_peft(kwargs, message):
    kwargs = {"target_modules": TARGETS, **kwargs}
    with pytest.raises(ValueError, match=message):
        peft.WaveFTConfig(**kwargs)
    with pytest.raises(ValueError, match=message):
        fxpeft.WaveFTConfig(**kwargs)


def test_what_peft_refuses_when_building_or_computing():
    model = models.MLP().eval()
    # too many coefficients for fc2 (5·24 = 120): PEFT's error when it builds the layer; the model is untouched
    with pytest.raises(ValueError, match="should be less than or equal to the product"):
        peft.get_peft_model(copy.deepcopy(model), peft.WaveFTConfig(target_modules=TARGETS, n_frequency=121))
    with pytest.raises(ValueError, match="should be less than or equal to the product"):
        fxpeft.transform(model, fxpeft.WaveFTConfig(target_modules=TARGETS, n_frequency=121))
    assert not any("waveft" in name for name, _ in model.named_modules())
    with pytest.raises(ValueError, match="positive integer"):
        fxpeft.WaveFTConfig(target_modules=TARGETS, n_frequency=0)
    # a family PEFT accepts but has no filters for: PEFT fails computing ΔW, fxpeft when the config is made
    failing = peft.get_peft_model(copy.deepcopy(model), peft.WaveFTConfig(target_modules=TARGETS, n_frequency=8,
                                                                           wavelet_family="db20"))
    with pytest.raises(ValueError, match="Unknown wavelet name"):
        failing(x())
    with pytest.raises(ValueError, match="no filters"):
        fxpeft.WaveFTConfig(target_modules=TARGETS, wavelet_family="db20")
    fxpeft.WaveFTConfig(target_modules=TARGETS, wavelet_family="db20", use_idwt=False)  # no filters needed
    with pytest.raises(ValueError, match="does not support"):  # PEFT: TypeError, linear layers only
        fxpeft.transform(models.ConvNet().eval(), fxpeft.WaveFTConfig(target_modules=["conv1"], n_frequency=4))


def test_half_precision_base_has_peft_tensors():
    kwargs = dict(target_modules=TARGETS, n_frequency=40, init_weights=False)
    assert_half_precision_like_peft(models.MLP().eval().to(torch.bfloat16), fxpeft.WaveFTConfig(**kwargs),
                                    peft.WaveFTConfig(**kwargs), "waveft_", x().to(torch.bfloat16))


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm, _ = pair()
    assert_no_weighted_adapter(gm, reference)
