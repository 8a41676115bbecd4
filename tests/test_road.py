"""RoAd beyond the conformance suite (tests/test_methods.py, which runs road_1): the road_2 and
road_4 variants, mixed batches and several active adapters against PEFT's own, and the inputs
PEFT refuses (add_weighted_adapter included). Oracle: the real PEFT package."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_both_refuse_config, assert_no_weighted_adapter, copy_adapter_weights

TARGETS = ["q_proj", "v_proj", "down_proj"]  # llama's 32-wide outputs: group_size 8 divides them


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return models.llama().eval(), models.hf_inputs("llama")


def pair(model, **kwargs):
    kwargs = dict(group_size=8, target_modules=TARGETS, init_weights=False, **kwargs)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.RoadConfig(**kwargs)).eval()
    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.RoadConfig(**kwargs)).eval()
    assert copy_adapter_weights(reference, gm) == 2 * len(TARGETS) * 2  # theta and alpha per site, 2 layers
    return gm, reference


@pytest.mark.parametrize("variant", ["road_2", "road_4"])
def test_variants_equal_peft_unmerged_and_merged(llama, variant):
    model, inputs = llama
    gm, reference = pair(model, variant=variant)
    assert gm.get_submodule("model.layers.0.self_attn.q_proj").road_theta["default"].shape == (
        32 * {"road_2": 1, "road_4": 2}[variant],)
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert (expected - model(**inputs).logits).abs().max() > 1e-3
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        q = "model.layers.0.self_attn.q_proj"
        torch.testing.assert_close(gm.get_submodule(q).weight, reference.base_model.model.get_submodule(q).weight,
                                   rtol=1e-5, atol=1e-6)


def test_mixed_batches_stacked_adapters_and_no_weighted_adapter_as_peft(llama):
    model, inputs = llama
    gm, reference = pair(model)
    torch.manual_seed(3)
    second = dict(group_size=8, target_modules=["q_proj", "down_proj"], init_weights=False, variant="road_2")
    reference.add_adapter("other", peft.RoadConfig(**second))
    gm.add_adapter("other", fxpeft.RoadConfig(**second))
    copy_adapter_weights(reference, gm)  # the new adapter is frozen in both: copy its tensors by name
    theirs = dict(reference.named_parameters())
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".other" in name:
                param.copy_(theirs["base_model.model." + name])
        names = ["other", "__base__", "default"]
        batch = models.hf_inputs("llama", batch=3)
        expected = reference(**batch, adapter_names=names).logits
        torch.testing.assert_close(gm(**batch, adapter_names=names).logits, expected, rtol=1e-5, atol=1e-5)
        # both active: PEFT rotates with "default" first, then "other"
        reference.base_model.set_adapter(["default", "other"])
        gm.set_adapter(["default", "other"])
        expected = reference(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-4, atol=1e-5)
    assert_no_weighted_adapter(gm, reference)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(variant="road_3"), "Invalid variant road_3"),
    (dict(group_size=5), "group_size must be divisible by 2"),
    (dict(group_size=0), "group_size must be divisible by 2"),
])
def test_invalid_configs_raise_at_construction_as_peft(kwargs, rule):
    assert_both_refuse_config("RoadConfig", kwargs, rule)


def test_layers_peft_does_not_adapt_raise_and_leave_the_model_alone():
    from transformers.pytorch_utils import Conv1D

    model = models.MLP().eval()  # fc2 has 5 outputs: no group_size of 4 divides them
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    config = dict(group_size=4, target_modules=["fc1", "fc2"])
    with pytest.raises(ValueError, match="divisible by group_size"):
        fxpeft.transform(model, fxpeft.RoadConfig(**config))
    with pytest.raises(ValueError, match="divisible by group_size"):
        peft.get_peft_model(copy.deepcopy(model), peft.RoadConfig(**config))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    for layer, inputs in ((Conv1D(8, 4), torch.randn(2, 3, 4)), (nn.Conv1d(4, 8, 3), torch.randn(2, 4, 10)),
                          (nn.Embedding(10, 8), torch.randint(0, 10, (2, 3)))):
        with pytest.raises(ValueError, match="not supported|does not support"):
            fxpeft.transform(nn.Sequential(layer), fxpeft.RoadConfig(group_size=4, target_modules=["0"]),
                             example_inputs=(inputs,))
        with pytest.raises(ValueError, match="torch.nn.Linear"):
            peft.get_peft_model(nn.Sequential(copy.deepcopy(layer)), peft.RoadConfig(group_size=4, target_modules=["0"]))
