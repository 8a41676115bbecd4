"""SHiRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's
random support, a custom ``mask_fn``, the support carried by checkpoints, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models


def pair(seed: int = 0, mask_fn=None, **kwargs):
    model = models.MLP().eval()
    kwargs = {"r": 2, "target_modules": ["fc1", "fc2"], **kwargs}
    theirs, ours = peft.ShiraConfig(**kwargs), fxpeft.ShiraConfig(**kwargs)
    if mask_fn is not None:
        theirs.mask_fn = ours.mask_fn = mask_fn
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), theirs).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, ours).eval()
    return reference, gm, model


@pytest.mark.parametrize("kwargs", [dict(), dict(random_seed=11, init_weights=False)])
def test_support_and_values_are_peft_draws(kwargs):
    reference, gm, _ = pair(**kwargs)
    for path in ("fc1", "fc2"):
        theirs, ours = reference.base_model.model.get_submodule(path), gm.get_submodule(path)
        assert torch.equal(ours.shira_indices["default"], theirs.shira_indices["default"])
        assert torch.equal(ours.shira_weight["default"], theirs.shira_weight["default"])
        assert ours.shira_indices["default"].shape == (2, 2 * sum(ours.weight.shape))


def first_entries(base_layer, r, **kwargs):
    """A custom support: the first r·(in + out) entries in row-major order."""
    mask = torch.zeros_like(base_layer.weight)
    mask.view(-1)[: r * sum(base_layer.weight.shape)] = 1
    return mask


def test_custom_mask_fn_and_its_support_loaded_from_a_checkpoint(tmp_path):
    """PEFT's way: ``config.mask_fn = fn`` after construction. The support is saved, so a PEFT checkpoint
    made with a custom mask loads with its support although the function is not saved."""
    with pytest.warns(UserWarning, match="please supply your own masking function"):
        reference, gm, model = pair(mask_fn=first_entries, mask_type="first", init_weights=False)
    indices = gm.fc2.shira_indices["default"]
    assert torch.equal(indices, reference.base_model.model.fc2.shira_indices["default"])
    first = torch.arange(2 * (24 + 5))  # fc2 is 5x24
    assert torch.equal(indices.long(), torch.stack([first // 24, first % 24]))
    x = torch.randn(3, 12)
    with torch.no_grad():
        gm.fc1.shira_weight["default"].copy_(reference.base_model.model.fc1.shira_weight["default"])
        gm.fc2.shira_weight["default"].copy_(reference.base_model.model.fc2.shira_weight["default"])
        expected = reference(x)
        torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    reference.save_pretrained(tmp_path)
    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    assert torch.equal(loaded.fc2.shira_indices["default"], indices)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_refused_layers_and_ranks_as_peft():
    """PEFT's SHiRA takes torch.nn.Linear only (TypeError for Conv1D), and no more entries than the weight has."""
    model = models.gpt2()
    with pytest.raises(TypeError, match="only the following modules are supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.ShiraConfig(r=1, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="SHiRA does not support transformers' Conv1D"):
        fxpeft.transform(model, fxpeft.ShiraConfig(r=1, target_modules=["c_attn"]))
    mlp = models.MLP()
    rule = "results in more shira params than the total number of params in the base layer 120"
    with pytest.raises(ValueError, match=rule):  # fc2: 5·(24 + 5) > 24·5
        peft.get_peft_model(copy.deepcopy(mlp), peft.ShiraConfig(r=5, target_modules=["fc1", "fc2"]))
    with pytest.raises(ValueError, match=rule):
        fxpeft.transform(mlp, fxpeft.ShiraConfig(r=5, target_modules=["fc1", "fc2"]))
    assert all(p.requires_grad for p in [*model.parameters(), *mlp.parameters()])
    with pytest.raises(ValueError, match="positive integer"):
        fxpeft.ShiraConfig(r=0)


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm, _ = pair()
    reference.add_adapter("other", peft.ShiraConfig(r=2, target_modules=["fc1"]))
    gm.add_adapter("other", fxpeft.ShiraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="ShiraConfig"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [0.5, 0.5], "mix")
    assert list(gm.peft_config) == ["default", "other"]
