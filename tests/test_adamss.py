"""AdaMSS beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's
initial state (the seeded decomposition, the clusters, A's orthonormal start and B's draws) without
copying, dynamic ranks, a layer without a bias, ASA's pruning in training, and the inputs PEFT
refuses."""
from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_half_precision_like_peft, assert_no_weighted_adapter, seeded_pair

TARGETS = ["fc1", "fc2"]


class NoBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16, bias=False)
        self.fc2 = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def pair(build=models.MLP, seed: int = 0, **kwargs):
    model = build().eval()
    kwargs = {"r": 8, "num_subspaces": 3, "subspace_rank": 2, "target_modules": TARGETS, "init_weights": None,
              **kwargs}
    return (*seeded_pair(model, fxpeft.AdamssConfig(**kwargs), peft.AdamssConfig(**kwargs), seed), model)


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("build, kwargs", [
    (models.MLP, {}), (models.MLP, dict(use_dynamic_rank=True, svd_threshold=0.3, random_seed=5)),
    (NoBias, dict(num_subspaces=4, subspace_rank=3)),
])
def test_initial_state_outputs_and_merge_are_peft(build, kwargs):
    reference, gm, model = pair(build, **kwargs)
    ours = {n: t for n, t in gm.state_dict().items() if "adamss_" in n}
    theirs = {n.removeprefix("base_model.model."): t for n, t in reference.state_dict().items() if "adamss_" in n}
    assert {n: t.shape for n, t in ours.items()} == {n: t.shape for n, t in theirs.items()}
    for name, value in ours.items():
        torch.testing.assert_close(value, theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    for name in TARGETS:
        assert torch.equal(gm.get_submodule(name).adamss_gate["default"].indices,
                           reference.base_model.model.get_submodule(name).scatter_index["default"])
    with torch.no_grad():
        expected = reference(x())
        assert (expected - model(x())).abs().max() > 1e-4
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-6)
        gm.merge_adapter()  # a layer with a bias: the bias changes too, as in PEFT
        reference.merge_adapter()
        for name, value in model.state_dict().items():
            theirs = reference.base_model.model.get_submodule(name.rpartition(".")[0]).base_layer
            torch.testing.assert_close(value, getattr(theirs, name.rpartition(".")[2]), rtol=1e-5, atol=1e-6)


def test_asa_prunes_subspaces_as_peft():
    """Same gradients, same importance statistics, same subspaces left training at each mask step."""
    asa = dict(use_asa=True, asa_target_subspaces=2, init_warmup=1, final_warmup=5, mask_interval=2)
    reference, gm, _ = pair(**asa)  # eval: the MLP's dropout would draw differently; gradients flow all the same
    inputs = torch.randn(8, 12, generator=torch.Generator().manual_seed(1))

    def pattern(module, prefix=""):
        return {n.removeprefix(prefix): p.requires_grad for n, p in module.named_parameters() if "adamss_" in n}

    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "adamss_" in n}
    for step in range(7):
        for model in (reference, gm):
            model.zero_grad()
            model(inputs).pow(2).mean().backward()
        for name, ours in gm.named_parameters():
            if ours.grad is not None:
                torch.testing.assert_close(ours.grad, theirs[name].grad, rtol=1e-5, atol=1e-7)
        reference.base_model.update_and_allocate(step)
        gm.update_and_allocate(step)
        assert pattern(gm) == pattern(reference, "base_model.model."), step
    assert sum(pattern(gm).values()) == 2 * 2  # two subspaces left, an A and a B each


@pytest.mark.parametrize("kwargs, message", [
    (dict(init_weights="gaussian"), "init_weights must be 'orthogonal' or None"),
    (dict(use_asa=True, mask_interval=0), "`mask_interval` must be a positive integer"),
    (dict(use_asa=True, init_warmup=10, final_warmup=10), "`init_warmup` must be smaller than `final_warmup`"),
    (dict(use_asa=True, asa_target_subspaces=0), "`asa_target_subspaces` must be a positive integer"),
    (dict(use_asa=True, asa_schedule_exponent=0.0), "`asa_schedule_exponent` must be a positive number"),
])
def test_invalid_configs_raise_as_peft(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft.AdamssConfig(target_modules=TARGETS, **kwargs)
    with pytest.raises(ValueError, match=message):
        fxpeft.AdamssConfig(target_modules=TARGETS, **kwargs)
    assert fxpeft.AdamssConfig(target_modules=TARGETS, init_weights=False).init_weights is None  # PEFT's reading


def test_half_precision_base_has_peft_tensors():
    kwargs = dict(r=8, num_subspaces=3, subspace_rank=2, target_modules=TARGETS, init_weights=None)
    assert_half_precision_like_peft(models.MLP().eval().to(torch.bfloat16), fxpeft.AdamssConfig(**kwargs),
                                    peft.AdamssConfig(**kwargs), "adamss_", x().to(torch.bfloat16))


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm, _ = pair()
    assert_no_weighted_adapter(gm, reference)
