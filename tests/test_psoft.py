"""PSOFT beyond the conformance suite (tests/test_methods.py): the options that change its init or
its R (pissa_init, the seeded low-rank SVD, a free R, no magnitude vectors, the Cayley-Neumann
series), dropout in training, and the inputs PEFT refuses. Oracle: the real PEFT package."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
from peft_oracle import assert_both_refuse_config, assert_no_weighted_adapter, copy_adapter_weights


def small():
    """Two linears without dropout in between (random draws are the adapters' alone)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)).eval()


X = torch.randn(5, 16)


def pair(**options):
    kwargs = dict(r=4, psoft_alpha=8, target_modules=["0", "2"], init_weights=False, **options)
    model = small()
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PsoftConfig(**kwargs)).eval()
    torch.manual_seed(1)
    gm = fxpeft.transform(model, fxpeft.PsoftConfig(**kwargs)).eval()
    return gm, reference


@pytest.mark.parametrize("options", [
    dict(ab_svd_init="pissa_init"),
    dict(psoft_svd="lowrank", psoft_svd_lowrank_niter=3, random_seed=7),
    dict(psoft_orth=False, psoft_mag_a=False),
    dict(psoft_mag_b=False, use_cayley_neumann=True, num_cayley_neumann_terms=4, cayley_neumann_eps=0.1),
])
def test_options_equal_peft(options):
    gm, reference = pair(**options)
    site, theirs = gm.get_submodule("0"), reference.base_model.model.get_submodule("0")
    # the same start without copying: R's draws, then A and B from the same SVD
    torch.testing.assert_close(site.psoft_gate["default"].A, theirs._psoft_A_cache["default"], rtol=0, atol=0)
    torch.testing.assert_close(site.psoft_gate["default"].B, theirs._psoft_B_cache["default"], rtol=0, atol=0)
    assert {n: p.shape for n, p in site.psoft_R["default"].named_parameters()} == {
        n: p.shape for n, p in theirs.psoft_R["default"].named_parameters()}
    assert copy_adapter_weights(reference, gm) > 0
    with torch.no_grad():
        expected = reference(X)
        assert (expected - small()(X)).abs().max() > 1e-4
        torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-6)
        gm.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(gm(X), reference(X), rtol=1e-5, atol=1e-6)


def test_lowrank_svd_leaves_the_global_rng_alone_and_follows_random_seed():
    config = dict(r=4, target_modules=["0"], psoft_svd="lowrank")
    torch.manual_seed(3)
    gm = fxpeft.transform(small(), fxpeft.PsoftConfig(**config))
    after = torch.rand(1)
    torch.manual_seed(3)
    small()
    assert torch.equal(torch.rand(1), after)  # nothing drawn from the global generator
    other = fxpeft.transform(small(), fxpeft.PsoftConfig(random_seed=1, **config))
    assert not torch.equal(gm.get_submodule("0").psoft_gate["default"].A, other.get_submodule("0").psoft_gate["default"].A)


def test_dropout_in_training_equals_peft_under_the_same_seed():
    gm, reference = pair(psoft_dropout=0.5)
    copy_adapter_weights(reference, gm)
    gm.train(), reference.train()
    torch.manual_seed(11)
    expected = reference(X)
    torch.manual_seed(11)
    torch.testing.assert_close(gm(X), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert (gm.eval()(X) - expected).abs().max() > 1e-4  # eval: no dropout


@pytest.mark.parametrize("kwargs, rule", [
    (dict(r=0), "`r` must be a positive integer"),
    (dict(ab_svd_init="olora"), "`ab_svd_init` must be one of"),
    (dict(psoft_svd="randomized"), "`psoft_svd` must be one of"),
    (dict(use_cayley_neumann=True, num_cayley_neumann_terms=0), "`num_cayley_neumann_terms` must be a positive"),
    (dict(use_cayley_neumann=True, cayley_neumann_eps=1.5), r"`cayley_neumann_eps` must be in \(0, 1\)"),
    (dict(target_modules=".*", layers_to_transform=[0]), "`layers_to_transform` cannot be used"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_invalid_configs_raise_at_construction_as_peft(kwargs, rule):
    assert_both_refuse_config("PsoftConfig", kwargs, rule)


def test_options_that_do_nothing_warn_as_peft():
    for kwargs in (dict(psoft_svd_lowrank_niter=3), dict(num_cayley_neumann_terms=3), dict(cayley_neumann_eps=0.5)):
        with pytest.warns(UserWarning, match="only used when"):
            fxpeft.PsoftConfig(**kwargs)
    with pytest.warns(UserWarning, match="fan_in_fan_out=False"):
        gm = fxpeft.transform(small(), fxpeft.PsoftConfig(r=4, target_modules=["0"], fan_in_fan_out=True))
    assert gm.peft_config["default"].fan_in_fan_out is False


def test_bad_layers_raise_and_leave_the_model_alone():
    from transformers.pytorch_utils import Conv1D

    model = small()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"must be less than or equal to min\(in_features, out_features\)"):
        fxpeft.transform(model, fxpeft.PsoftConfig(r=10, target_modules=["0", "2"]))
    with pytest.raises(ValueError, match=r"must be less than or equal to min\(in_features, out_features\)"):
        peft.get_peft_model(copy.deepcopy(model), peft.PsoftConfig(r=10, target_modules=["0", "2"]))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert list(model.state_dict()) == list(weights)
    with pytest.raises(ValueError, match="only torch.nn.Linear"):
        fxpeft.transform(nn.Sequential(Conv1D(8, 4)), fxpeft.PsoftConfig(r=2, target_modules=["0"]),
                         example_inputs=(torch.randn(2, 3, 4),))
    with pytest.raises(ValueError, match="Only torch.nn.Linear"):
        peft.get_peft_model(nn.Sequential(Conv1D(8, 4)), peft.PsoftConfig(r=2, target_modules=["0"]))


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    assert_no_weighted_adapter(*pair())
