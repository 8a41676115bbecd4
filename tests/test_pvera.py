"""PVeRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: sampling in
training and with ``sample_at_inference`` (the same draws as PEFT's, from a seeded generator or the
global one), the mean-only merge, projections left out of checkpoints, PEFT's rules for several
adapters, and the inputs PEFT refuses. The shared projections are VeRA's code (tests/test_vera.py)."""
from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models

TARGETS = ["fc1", "fc2"]


def pair(**kwargs):
    model = models.MLP().eval()
    kwargs = {"r": 4, "target_modules": TARGETS, "init_weights": False, **kwargs}
    torch.manual_seed(0)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.PveraConfig(**kwargs)).eval()
    torch.manual_seed(0)
    gm = fxpeft.transform(model, fxpeft.PveraConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in gm.named_parameters():
            if p.requires_grad:
                p.copy_(reference.get_parameter("base_model.model." + name))
    return reference, gm, model


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def test_training_samples_peft_draws_and_eval_uses_the_mean():
    reference, gm, _ = pair(generator_seed=7)
    with torch.no_grad():
        mean = gm(x())
        torch.testing.assert_close(mean, reference(x()), rtol=1e-5, atol=1e-5)
        gm.train(), reference.train()
        for step in range(2):  # each site's generator advances in both packages
            torch.manual_seed(step)  # the model's own dropout draws from the global generator
            sampled = gm(x())
            torch.manual_seed(step)
            torch.testing.assert_close(sampled, reference(x()), rtol=1e-5, atol=1e-5)
            assert (sampled - mean).abs().max() > 1e-2
        # no generator_seed: torch's global generator, drawn in the same order as PEFT
        unseeded, unseeded_gm, _ = pair()
        unseeded.train(), unseeded_gm.train()
        torch.manual_seed(1)
        expected = unseeded(x())
        torch.manual_seed(1)
        torch.testing.assert_close(unseeded_gm(x()), expected, rtol=1e-5, atol=1e-5)
        # merging folds the mean: the merged eval output is the unmerged one
        gm.eval()
        gm.merge_adapter()
        torch.testing.assert_close(gm(x()), mean, rtol=1e-5, atol=1e-5)


def test_sample_at_inference_samples_in_eval_as_peft():
    reference, gm, _ = pair(generator_seed=7, sample_at_inference=True)
    with torch.no_grad():
        first = gm(x())
        torch.testing.assert_close(first, reference(x()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-5)
        assert (gm(x()) - first).abs().max() > 1e-2
    assert "sampled at inference" in str(fxpeft.inspect(gm))


def test_adapter_added_in_eval_does_not_sample():
    """PEFT samples by its layer's flag: a new adapter on a model in eval mode gives its mean."""
    reference, gm, _ = pair()
    gm.add_adapter("two", fxpeft.PveraConfig(r=4, target_modules=TARGETS, init_weights=False))
    gm.set_adapter("two")
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), gm(x()), rtol=0, atol=0)


def test_unsaved_projections_load_both_ways(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's (and fxpeft's) warning for save_projection=False
        reference, gm, model = pair(save_projection=False)
        reference.save_pretrained(tmp_path / "peft")
        fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
        keys = set(load_file(tmp_path / "fx" / "adapter_model.safetensors"))
        assert keys == set(load_file(tmp_path / "peft" / "adapter_model.safetensors"))
        assert not any("pvera_A" in k for k in keys)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
        gm.load_adapter(str(tmp_path / "peft"), "loaded")
    gm.set_adapter("loaded")
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x()), reference(x()), rtol=1e-5, atol=1e-5)


def test_later_adapters_follow_peft_rules():
    reference, gm, _ = pair()
    assert gm.pvera_A["default"].shape == (8, 24) and gm.pvera_B["default"].shape == (24, 4)
    assert torch.equal(gm.pvera_A["default"], reference.base_model.pvera_A["default"])
    for fx_kwargs, rule in [(dict(projection_prng_key=1), "PVeRA PRNG initialisation key must be the same"),
                            (dict(r=8), "pvera_A has a size of 8 but 16"),
                            (dict(r=2), "needs the first one's r")]:
        with pytest.raises(ValueError, match=rule):
            gm.add_adapter("bad", fxpeft.PveraConfig(target_modules=TARGETS, **{"r": 4, **fx_kwargs}))
        assert list(gm.peft_config) == ["default"]
    with pytest.raises(ValueError, match="PVeRA PRNG initialisation key must be the same"):
        reference.add_adapter("bad", peft.PveraConfig(r=4, target_modules=TARGETS, projection_prng_key=1))


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm, _ = pair()
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default"], [0.5], "mix")
    with pytest.raises(ValueError, match="PveraConfig"):
        fxpeft.add_weighted_adapter(gm, ["default"], [0.5], "mix")


@pytest.mark.parametrize("kwargs, rule", [
    (dict(layers_pattern="layers"), "layers_to_transform"),  # PEFT raises this one at construction too
    (dict(r=0), "positive integer"),
    (dict(pvera_dropout=1.5), "pvera_dropout"),
    (dict(bias="lora_only"), "pvera_only"),
    (dict(generator_seed=0.5), "generator_seed"),
])
def test_bad_configs_raise_at_construction(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        fxpeft.PveraConfig(**kwargs)
    if "layers_pattern" in kwargs:
        with pytest.raises(ValueError, match=rule):
            peft.PveraConfig(**kwargs)


def test_conv_sites_are_refused_as_peft():
    model = models.ConvNet()
    with pytest.raises(ValueError, match="pvera does not support convolution"):
        fxpeft.transform(model, fxpeft.PveraConfig(r=4, target_modules=["conv1"]))
    with pytest.raises(ValueError, match="No layers types compatible with PVeRA"):
        peft.get_peft_model(copy.deepcopy(model), peft.PveraConfig(r=4, target_modules=["conv1"]))
