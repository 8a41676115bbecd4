"""Lily beyond the conformance suite (tests/test_methods.py, whose MLP has no layers to share across):
A and B shared across a llama's layers as PEFT shares them (draws, training, checkpoints), regex
targets, PEFT ignoring adapter_names, and the inputs PEFT refuses. Oracle: the real PEFT package."""
from __future__ import annotations

import copy

import peft
import pytest
import torch
from torch import nn

import fxpeft
import models
from peft_oracle import assert_both_refuse_config, assert_no_weighted_adapter, assert_same_saved_tensors

KWARGS = dict(r=4, stride_A=2, num_B=3, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return models.llama().eval(), models.hf_inputs("llama")


def pair(model, **kwargs):
    torch.manual_seed(1)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LilyConfig(**kwargs)).eval()
    torch.manual_seed(1)
    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.LilyConfig(**kwargs)).eval()
    return gm, reference


def trainables(module, prefix=""):
    return {n.removeprefix(prefix): p for n, p in module.named_parameters() if p.requires_grad}


def test_sharing_across_layers_equals_peft(llama, tmp_path):
    model, inputs = llama
    gm, reference = pair(model, **KWARGS)
    ours, theirs = trainables(gm), trainables(reference, "base_model.model.")
    assert set(ours) == set(theirs) and all(torch.equal(ours[n], theirs[n]) for n in ours)  # PEFT's draws
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    q0, q1 = (gm.get_submodule(f"model.layers.{i}.self_attn.q_proj") for i in (0, 1))
    v0 = gm.get_submodule("model.layers.0.self_attn.v_proj")
    assert q0.lily_A["default"] is q1.lily_A["default"] and q0.lily_B["default"] is q1.lily_B["default"]
    assert q0.lily_router["default"] is not q1.lily_router["default"] and q0.lily_B["default"] is not v0.lily_B["default"]
    with torch.no_grad():
        expected = reference(**inputs).logits
        assert (expected - model(**inputs).logits).abs().max() > 1e-3
        torch.testing.assert_close(gm(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        # PEFT's Lily applies the active adapter to every sample whatever adapter_names says (checked, so a PEFT
        # that learns mixed batches switches this back); fxpeft's mixed batches are the suite's
        torch.testing.assert_close(reference(**inputs, adapter_names=["__base__", "__base__"]).logits, expected)
        torch.testing.assert_close(gm(**inputs, adapter_names=["__base__", "__base__"]).logits,
                                   model(**inputs).logits, rtol=1e-5, atol=1e-5)
    # training: a shared A or B gathers every site's gradient, as PEFT's
    for module in (gm, reference):
        module.train()
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        module(**inputs).logits.pow(2).mean().backward()
        optimizer.step()
    for name, param in trainables(reference, "base_model.model.").items():
        torch.testing.assert_close(ours[name], param, rtol=1e-5, atol=1e-6)
    # checkpoints: a copy per site, as PEFT writes; each package loads the other's
    reference.save_pretrained(tmp_path / "peft")
    gm.save_pretrained(str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        expected = reference.eval()(**inputs).logits
        torch.testing.assert_close(back(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    layers = loaded.model.layers
    assert layers[0].mlp.down_proj.lily_A["default"] is layers[1].mlp.down_proj.lily_A["default"]


def test_a_regex_target_is_one_group_per_shape_as_peft(llama):
    model, inputs = llama
    gm, reference = pair(model, r=4, num_B=2, target_modules=r".*\.(q_proj|k_proj|v_proj)")
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    attention = gm.model.layers[1].self_attn
    assert attention.q_proj.lily_B["default"] is gm.model.layers[0].self_attn.q_proj.lily_B["default"]
    assert attention.k_proj.lily_B["default"] is attention.v_proj.lily_B["default"]  # both (16, 32)
    assert attention.q_proj.lily_B["default"] is not attention.k_proj.lily_B["default"]
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(stride_A=0), "`stride_A` must be at least 1"),
    (dict(num_B=1), "`num_B` must be at least 2"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_invalid_configs_raise_at_construction_as_peft(kwargs, rule):
    assert_both_refuse_config("LilyConfig", kwargs, rule)


def test_bad_input_raises_and_leaves_the_model_alone():
    from transformers.pytorch_utils import Conv1D

    model = models.MLP().eval()
    with pytest.raises(ValueError, match="`r` should be a positive integer"):  # PEFT: when it builds the layer
        fxpeft.LilyConfig(r=0)
    with pytest.raises(ValueError, match="`r` should be a positive integer"):
        peft.get_peft_model(copy.deepcopy(model), peft.LilyConfig(r=0, target_modules=["fc1"]))
    gpt2_style = nn.Sequential(Conv1D(8, 4))
    with pytest.raises(NotImplementedError, match="Lily does not support target modules of type"):
        fxpeft.transform(gpt2_style, fxpeft.LilyConfig(r=2, target_modules=["0"]), example_inputs=(torch.randn(2, 3, 4),))
    with pytest.raises(NotImplementedError, match="Lily does not support target modules of type"):
        peft.get_peft_model(copy.deepcopy(gpt2_style), peft.LilyConfig(r=2, target_modules=["0"]))
    gm = fxpeft.transform(model, fxpeft.LilyConfig(r=2, target_modules=["fc1"]))
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LilyConfig(r=2, target_modules=["fc1"]))
    assert_no_weighted_adapter(gm, reference)
    with pytest.raises(NotImplementedError, match="cannot be merged"):
        fxpeft.merge_and_unload(gm)
    assert list(gm.peft_config) == ["default"]
