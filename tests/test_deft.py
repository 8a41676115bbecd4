"""DeFT beyond the conformance suite (tests/test_methods.py), against the real PEFT package: the ``qr``
decomposition, PaRa (``para``), the data-dependent identity init and PEFT's draws for the same seed, r
capped at the output features, dropout in training, several adapters merged, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

TARGETS = ["fc1", "fc2"]


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def pair(model, **kwargs):
    kwargs = {"r": 3, "target_modules": TARGETS, **kwargs}
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.DeftConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.DeftConfig(**kwargs)).eval()
    return reference, gm


@pytest.mark.parametrize("options", [dict(decomposition_method="qr", alpha=6, init_weights=False, init_scale=3.0),
                                     dict(para=True, r=8)])  # r=8 > fc2's 5 outputs: capped, as PEFT
def test_options_equal_peft_with_the_same_seed(options, tmp_path):
    model = models.MLP().eval()
    reference, gm = pair(model, **options)
    with torch.no_grad():
        expected = reference(x())
        assert (expected - model(x())).abs().max() > 1e-4
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)  # PEFT's draws, no copying
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)


def test_identity_init_reads_the_weight_as_peft():
    """R = rightᵀ W / s from the base weight, P drawn as PEFT draws it (Conv1D's transposed weight: the
    identity start of the conformance suite's GPT-2 row)."""
    reference, gm = pair(models.MLP().eval(), alpha=4, decomposition_method="qr")
    for name, p in gm.named_parameters():
        if "deft_" in name:
            torch.testing.assert_close(p, reference.get_parameter("base_model.model." + name), rtol=1e-5, atol=1e-6)


def test_dropout_in_training_draws_as_peft():
    model = models.MLP()
    reference, gm = pair(model, init_weights=False, deft_dropout=0.5)
    reference.train(), gm.train()
    with torch.no_grad():
        torch.manual_seed(5)
        expected = reference(x())
        torch.manual_seed(5)
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)
        gm.eval()
        assert (gm(x()) - expected).abs().max() > 1e-3  # the dropout acted


def test_two_adapters_merge_as_their_unmerged_sum():
    model = models.MLP().eval()
    reference, gm = pair(model, init_weights=False)
    for module in (reference, gm):
        torch.manual_seed(1)
        config = (peft.DeftConfig if module is reference else fxpeft.DeftConfig)(r=2, target_modules=TARGETS,
                                                                                 init_weights=False)
        module.add_adapter("two", config)
    reference.base_model.set_adapter(["default", "two"])
    gm.set_adapter(["default", "two"])
    weight = model.fc1.weight.detach().clone()
    with torch.no_grad():
        unmerged = reference(x())
        torch.testing.assert_close(gm(x()), unmerged, rtol=1e-5, atol=1e-5)
        reference.merge_adapter()  # one call: both against the unmerged weight
        gm.merge_adapter()
        torch.testing.assert_close(model.fc1.weight, reference.base_model.model.fc1.base_layer.weight)
        torch.testing.assert_close(gm(x()), unmerged, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        torch.testing.assert_close(model.fc1.weight, weight, rtol=0, atol=1e-6)
        # merged one after the other: fxpeft still merges against the unmerged weight (PEFT reads the merged
        # one for the second adapter, so its merged outputs then differ from its unmerged ones)
        gm.merge_adapter(["default"])
        gm.merge_adapter(["two"])
        torch.testing.assert_close(gm(x()), unmerged, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, rule", [
    (dict(decomposition_method="svd"), "Unknown decomposition_method"),
    (dict(target_modules=".*fc.*", layers_to_transform=[0]), "`layers_to_transform` cannot be used"),
    (dict(target_modules=".*fc.*", layers_pattern="layers"), "`layers_pattern` cannot be used"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_peft_invalid_configs_raise_at_construction(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        peft.DeftConfig(**kwargs)
    with pytest.raises(ValueError, match=rule):
        fxpeft.DeftConfig(**kwargs)


def test_fxpeft_checks_refused_layers_and_no_weighted_adapter():
    for kwargs, rule in [(dict(r=0), "positive integer"), (dict(deft_dropout=2.0), "deft_dropout"),
                         (dict(bias="lora_only"), "deft_only")]:
        with pytest.raises(ValueError, match=rule):
            fxpeft.DeftConfig(**kwargs)
    conv = models.ConvNet()
    with pytest.raises(TypeError, match="not supported"):
        peft.get_peft_model(copy.deepcopy(conv), peft.DeftConfig(target_modules=["conv1"]))
    with pytest.raises(ValueError, match="deft does not support convolution"):
        fxpeft.transform(conv, fxpeft.DeftConfig(target_modules=["conv1"]))
    reference, gm = pair(models.MLP().eval())
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default"], [0.5], "mix")
    with pytest.raises(ValueError, match="DeftConfig"):
        fxpeft.add_weighted_adapter(gm, ["default"], [0.5], "mix")
