"""BEFT beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's
default targets, the layers it refuses, merging into a layer without a bias, add_weighted_adapter."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models


def test_default_targets_are_peft_value_projections():
    model = models.llama()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(init_weights=False))
    gm = fxpeft.transform(model, fxpeft.BeftConfig(init_weights=False))
    ours = {n for n, p in gm.named_parameters() if p.requires_grad}
    theirs = {n.removeprefix("base_model.model.") for n, p in reference.named_parameters() if p.requires_grad}
    assert ours == theirs and ours and all("v_proj.beft_bias" in n for n in ours)


def test_conv1d_is_refused_as_peft():
    """PEFT's BEFT takes torch.nn.Linear only (TypeError for GPT-2's Conv1D); fxpeft raises before any change."""
    model = models.gpt2()
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="BEFT does not support transformers' Conv1D"):
        fxpeft.transform(model, fxpeft.BeftConfig(target_modules=["c_attn"]))
    assert all(p.requires_grad for p in model.parameters())


def test_merging_into_a_layer_without_bias_raises_and_changes_nothing():
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3)).eval()
    config = dict(target_modules=["0", "2"], init_weights=False)
    with pytest.warns(UserWarning, match="no bias term"):
        reference = peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(**config))
    with pytest.raises(ValueError, match="Base layer has no bias"):
        reference.merge_adapter()
    with pytest.warns(UserWarning, match="no bias term"):
        gm = fxpeft.transform(model, fxpeft.BeftConfig(**config)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="changes the layer's bias and the layer has none"):
        gm.merge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert fxpeft.active_adapters(gm) == ["default"] and not gm.get_submodule("2").beft_gate["default"].merged


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    model = models.MLP()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.BeftConfig(target_modules=["fc1"]))
    reference.add_adapter("other", peft.BeftConfig(target_modules=["fc1"]))
    gm = fxpeft.transform(model, fxpeft.BeftConfig(target_modules=["fc1"]))
    gm.add_adapter("other", fxpeft.BeftConfig(target_modules=["fc1"]))
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="BeftConfig"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [0.5, 0.5], "mix")
    assert list(gm.peft_config) == ["default", "other"]
