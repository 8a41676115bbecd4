"""FourierFT beyond the conformance suite (tests/test_methods.py), against the real PEFT package and
the method's formula: PEFT's spectral entry locations and draws, n_frequency_pattern, ΔW as the
real part of an inverse 2-D DFT, and the inputs PEFT refuses."""
from __future__ import annotations

import copy
import math

import peft
import pytest
import torch

import fxpeft
import models


def pair(build=models.MLP, seed: int = 0, **kwargs):
    model = build().eval()
    kwargs = {"n_frequency": 30, "scaling": 5.0, "target_modules": ["fc1", "fc2"], **kwargs}
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.FourierFTConfig(**kwargs)).eval()
    return reference, gm, model


@pytest.mark.parametrize("seed_kwargs", [{}, {"random_loc_seed": 5}])
def test_locations_and_spectrum_are_peft_draws(seed_kwargs):
    reference, gm, _ = pair(**seed_kwargs)
    for path in ("fc1", "fc2"):
        theirs = reference.base_model.model.get_submodule(path)
        ours = gm.get_submodule(path)
        assert torch.equal(ours.fourierft_gate["default"].indices, theirs.indices["default"])
        assert torch.equal(ours.fourierft_spectrum["default"], theirs.fourierft_spectrum["default"])
    x = torch.randn(3, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_locations_follow_peft():
    """Conv1D stores (in, out): the locations are still (row, column) of the (out, in) ΔW."""
    reference, gm, _ = pair(models.gpt2, target_modules=["c_attn"])
    theirs = reference.base_model.model.transformer.h[1].attn.c_attn
    assert torch.equal(gm.transformer.h[1].attn.c_attn.fourierft_gate["default"].indices, theirs.indices["default"])


def test_n_frequency_pattern_as_peft():
    """PEFT's lookup: a key matching ``.*\\.<key>$``, else the module path itself."""
    pattern = {"fc2": 7, r"h\.1\.attn\.c_attn": 9}
    for build, targets in ((models.MLP, ["fc1", "fc2"]), (models.gpt2, ["c_attn"])):
        reference, gm, _ = pair(build, target_modules=targets, n_frequency_pattern=pattern)
        theirs = {n.removeprefix("base_model.model."): p.numel() for n, p in reference.named_parameters()
                  if "fourierft_spectrum" in n}
        ours = {n: p.numel() for n, p in gm.named_parameters() if "fourierft_spectrum" in n}
        assert ours == theirs
        assert set(ours.values()) == ({30, 7} if build is models.MLP else {30, 9})


def test_delta_weight_is_the_inverse_dft_formula():
    """ΔW[m, n] = s / (M N) Σ_k,l S[k, l] cos(2π (k m / M + l n / N)) for the real spectrum S."""
    _, gm, _ = pair(scaling=3.0)
    gm.merge_adapter()
    merged = gm.fc2.weight.detach().clone()
    gm.unmerge_adapter()
    module = gm.fc2
    dense = torch.zeros(5, 24, dtype=torch.float64)
    rows, cols = module.fourierft_gate["default"].indices
    dense[rows, cols] = module.fourierft_spectrum["default"].detach().double()
    m, n = torch.arange(5, dtype=torch.float64), torch.arange(24, dtype=torch.float64)
    phase = 2 * math.pi * (m[:, None, None, None] * m[None, None, :, None] / 5
                           + n[None, :, None, None] * n[None, None, None, :] / 24)  # [m, n, k, l]
    expected = 3.0 * (dense[None, None] * torch.cos(phase)).sum((2, 3)) / (5 * 24)
    torch.testing.assert_close(merged - module.weight.detach(), expected.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(target_modules="fc.", layers_to_transform=[0]), "`layers_to_transform` cannot be used when"),
    (dict(target_modules="fc.", layers_pattern="h"), "`layers_pattern` cannot be used when"),
    (dict(target_modules=["fc1"], layers_pattern="h"), "`layers_to_transform` must also be specified"),
    (dict(target_modules=["fc1"], n_frequency=0), "positive integer"),
    (dict(target_modules=["fc1"], n_frequency_pattern={"fc1": -2}), "positive integer"),
    (dict(target_modules=["fc1"], bias="lora_only"), "'fourier_only'"),
])
def test_invalid_configs_raise_naming_the_rule(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        fxpeft.FourierFTConfig(**kwargs)


def test_too_many_frequencies_raise_before_any_change():
    model = models.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="less than or equal to the product"):  # PEFT's rule: fc2 has 24·5
        peft.get_peft_model(copy.deepcopy(model), peft.FourierFTConfig(n_frequency=121, target_modules=["fc1", "fc2"]))
    with pytest.raises(ValueError, match="less than or equal to the product of the input and output dimensions"):
        fxpeft.transform(model, fxpeft.FourierFTConfig(n_frequency=121, target_modules=["fc1", "fc2"]))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(p.requires_grad is False for p in model.parameters())


def test_non_linear_targets_raise():
    """PEFT's FourierFT takes nn.Linear and Conv1D only (a TypeError there)."""
    with pytest.raises(ValueError, match="fourierft does not support convolution layers"):
        fxpeft.transform(models.ConvNet(), fxpeft.FourierFTConfig(n_frequency=4, target_modules=["conv1"]))


@pytest.mark.parametrize("bias", ["fourier_only", "all"])
def test_bias_modes_train_and_save_as_peft(bias, tmp_path):
    from peft_oracle import same_trainables_and_files

    keys = same_trainables_and_files(*pair(target_modules=["fc1"], bias=bias)[:2], str(tmp_path))
    assert "base_model.model.fc1.base_layer.bias" in keys and ("base_model.model.fc2.bias" in keys) == (bias == "all")
