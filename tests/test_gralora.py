"""GraLoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: the
k × k grid (k > 1 on linear layers, with the hybrid LoRA part), PEFT's draws, ΔW, inputs of any
rank, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft


class Wide(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(12, 24)
        self.down = nn.Linear(24, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("kwargs", [dict(r=6, gralora_k=3), dict(r=4, gralora_k=2, hybrid_r=2, alpha=3)])
def test_grid_equals_peft(kwargs):
    """Same seed, same draws; outputs (2-D and 3-D inputs, as PEFT takes) and ΔW equal PEFT's."""
    model = Wide().eval()
    kwargs = dict(target_modules=["up", "down"], init_weights=False, **kwargs)
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.GraloraConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.GraloraConfig(**kwargs)).eval()
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "gralora_" in n}
    ours = {n: p for n, p in gm.named_parameters() if "gralora_" in n}
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)
    with torch.no_grad():
        for x in (torch.randn(4, 12), torch.randn(2, 5, 12)):
            torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)
        weight = model.up.weight.clone()
        gm.merge_adapter()
        torch.testing.assert_close(model.up.weight - weight, reference.base_model.model.up.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-6)
        gm.unmerge_adapter()


def test_grid_blocks_follow_the_written_formula():
    """Block (j, n) of ΔW/s is (A_n[:, slice j] B_j[slice n, :])^T; a 4-d input (which PEFT's view refuses)
    gets x ΔW^T."""
    model = Wide().eval()
    gm = fxpeft.transform(model, fxpeft.GraloraConfig(r=6, gralora_k=3, alpha=6, target_modules=["up"],
                                                      init_weights=False)).eval()
    a, b = gm.up.gralora_A["default"].detach(), gm.up.gralora_B["default"].detach()  # (3, 4, 6), (3, 6, 8)
    delta = torch.zeros(24, 12)
    for j in range(3):
        for n in range(3):
            delta[8 * j:8 * j + 8, 4 * n:4 * n + 4] = (a[n][:, 2 * j:2 * j + 2] @ b[j][2 * n:2 * n + 2, :]).T
    x = torch.randn(2, 3, 4, 12)
    with torch.no_grad():
        expected = model.down(torch.tanh(model.up(x) + x @ delta.T))
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, named", [(dict(r=5, gralora_k=2), "r should be divisible by gralora_k"),
                                           (dict(gralora_k=0), "`gralora_k` should be a positive integer")])
def test_bad_configs_raise_at_construction_as_peft(kwargs, named):
    for config_type in (peft.GraloraConfig, fxpeft.GraloraConfig):
        with pytest.raises(ValueError, match=named):
            config_type(target_modules=["up"], **kwargs)


@pytest.mark.parametrize("kwargs, named", [(dict(hybrid_r=-1), "hybrid_r"), (dict(gralora_dropout=2.0), "dropout"),
                                           (dict(bias="lora_only"), "bias")])
def test_what_peft_refuses_late_or_never_raises_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        fxpeft.GraloraConfig(target_modules=["up"], **kwargs)
    if "hybrid_r" in kwargs:  # PEFT: when it builds the layer
        with pytest.raises(ValueError, match=named):
            peft.get_peft_model(Wide(), peft.GraloraConfig(target_modules=["up"], **kwargs))


@pytest.mark.parametrize("features, named", [((10, 12), "in_features should be divisible"),
                                             ((12, 10), "out_features should be divisible")])
def test_features_the_grid_does_not_divide_raise_and_leave_the_model_alone(features, named):
    model = nn.Sequential(nn.Linear(*features))
    weights = {key: v.clone() for key, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=named):
        peft.get_peft_model(copy.deepcopy(model), peft.GraloraConfig(r=4, gralora_k=4, target_modules=["0"]))
    with pytest.raises(ValueError, match=named):
        fxpeft.transform(model, fxpeft.GraloraConfig(r=4, gralora_k=4, target_modules=["0"]))
    assert all(torch.equal(v, weights[key]) for key, v in model.state_dict().items())
