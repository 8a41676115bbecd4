"""OSF beyond the conformance suite (tests/test_methods.py): the projected gradients (PEFT's hooks;
eager and compiled), effective_rank / rank_pattern, the default targets, and the inputs PEFT
refuses. Oracle: the real PEFT package."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_no_weighted_adapter, copy_adapter_weights


def small():
    """fc1 widens (out > in: U_high is kept), fc2 narrows (V_high is kept); no dropout."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 6)).eval()


X = torch.randn(5, 10)


def pair(**options):
    kwargs = dict(target_modules=["0", "2"], init_weights=False, **options)
    model = small()
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.OSFConfig(**kwargs))
    torch.manual_seed(1)
    gm = fxpeft.transform(model, fxpeft.OSFConfig(**kwargs))
    return gm, reference


def grads(module, prefix=""):
    return {n.removeprefix(prefix): p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_gradients_are_projected_as_peft_eager_and_compiled():
    gm, reference = pair()
    assert copy_adapter_weights(reference, gm) == 6  # PEFT's draws, copied all the same
    reference(X).pow(2).sum().backward()
    gm(X).pow(2).sum().backward()
    theirs, ours = grads(reference, "base_model.model."), grads(gm)
    assert set(ours) == set(theirs) == {f"{i}.osf_svd_params.default.{n}" for i in "02" for n in ("U_low", "S_low", "V_low")}
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)
    # the projection bites: U's gradient is orthogonal to the frozen top subspace, V's too
    for i, side in (("0", "U"), ("2", "V")):
        gate = gm.get_submodule(i).osf_gate["default"]
        high, grad = getattr(gate, f"{side}_high"), ours[f"{i}.osf_svd_params.default.{side}_low"]
        assert grad.abs().max() > 1e-3
        product = high.t() @ grad if side == "U" else grad @ high.t()
        assert product.abs().max() < 1e-5 * grad.abs().max()
    gm.zero_grad()
    compiled = torch.compile(gm, fullgraph=True, backend=models.COMPILE_BACKEND)
    compiled(X).pow(2).sum().backward()
    for name, grad in grads(gm).items():
        torch.testing.assert_close(grad, ours[name], rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


@pytest.mark.parametrize("options", [
    dict(effective_rank=3),
    dict(effective_rank=0.75),
    dict(effective_rank=2, rank_pattern={r"^2$": 0.5}),
])
def test_effective_rank_and_rank_pattern_as_peft(options):
    gm, reference = pair(**options)
    theirs = {n.removeprefix("base_model.model."): p.shape for n, p in reference.named_parameters() if p.requires_grad}
    assert {n: p.shape for n, p in gm.named_parameters() if p.requires_grad} == theirs
    copy_adapter_weights(reference, gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(X), reference(X), rtol=1e-5, atol=1e-6)


def test_without_target_modules_every_linear_is_adapted_as_peft():
    model = small()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.OSFConfig())
    gm = fxpeft.transform(model, fxpeft.OSFConfig())
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    assert sorted(gm.peft_config["default"].target_modules) == ["0", "2"]


def test_unmerging_restores_the_weights_where_peft_refuses():
    gm, reference = pair()
    copy_adapter_weights(reference, gm)
    reference.merge_adapter()
    with pytest.raises(NotImplementedError, match="unmerging"):
        reference.unmerge_adapter()
    weights = {k: v.clone() for k, v in small().state_dict().items()}
    with torch.no_grad():
        gm.merge_adapter()
        torch.testing.assert_close(gm.get_submodule("0").weight, reference.base_model.model[0].base_layer.weight)
        gm.unmerge_adapter()
    for key, value in weights.items():
        torch.testing.assert_close(gm.get_parameter(key), value, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_and_leaves_the_model_alone():
    from transformers.pytorch_utils import Conv1D

    model = small()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`effective_rank` should be a positive integer"):
        fxpeft.transform(model, fxpeft.OSFConfig(target_modules=["0", "2"], rank_pattern={"2": 0}))
    with pytest.raises(ValueError, match="`effective_rank` should be a positive integer"):
        peft.get_peft_model(copy.deepcopy(model), peft.OSFConfig(target_modules=["0", "2"], rank_pattern={"2": 0}))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="Linear layers only"):  # PEFT adapts nothing there, silently
        fxpeft.transform(nn.Sequential(Conv1D(8, 4)), fxpeft.OSFConfig(target_modules=["0"]),
                         example_inputs=(torch.randn(2, 3, 4),))
    gm, reference = pair()
    assert_no_weighted_adapter(gm, reference)
    assert list(gm.peft_config) == ["default"]
