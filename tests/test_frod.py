"""FRoD beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's
initial state (the per-category basis, S's positions, U and λ, the init_weights=False draws) without
copying anything, save_projection=False both ways, several adapters (PEFT's rules, merged together
against W₀, deleted one by one) and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models
from peft_oracle import assert_half_precision_like_peft, assert_no_weighted_adapter, seeded_pair

TARGETS = ["fc1", "fc2"]


def pair(seed: int = 0, **kwargs):
    model = models.MLP().eval()
    kwargs = {"target_modules": TARGETS, "sparse_rate": 0.1, "progressbar": False, "init_weights": False, **kwargs}
    return (*seeded_pair(model, fxpeft.FrodConfig(**kwargs), peft.FrodConfig(**kwargs), seed), model)


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def test_initial_state_and_outputs_are_peft():
    reference, gm, _ = pair()
    for name in TARGETS:
        ours, theirs = gm.get_submodule(name), reference.base_model.model.get_submodule(name)
        torch.testing.assert_close(ours.frod_U["default"], theirs.frod_U["default"])
        for container in ("frod_lambda_l", "frod_lambda_s_values"):
            torch.testing.assert_close(getattr(ours, container)["default"], getattr(theirs, container)["default"])
        assert torch.equal(gm.frod_s_indices[name]["default"], reference.base_model.frod_s_indices[name]["default"])
        torch.testing.assert_close(gm.frod_V[name]["default"], reference.base_model.frod_V[name]["default"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-5)
    # the basis is kept once on the module, grouped by category as PEFT's tuner keeps it
    assert sorted(k for k in gm.state_dict() if "frod_V" in k) == ["frod_V.fc1.default", "frod_V.fc2.default"]


def test_without_saved_projections_both_ways(tmp_path):
    reference, gm, model = pair(save_projection=False)
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "fx" / "adapter_model.safetensors")))
    assert keys == set(load_file(str(tmp_path / "peft" / "adapter_model.safetensors")))
    assert not any("frod_V" in k or "frod_s_" in k for k in keys)
    with torch.no_grad():
        expected = reference(x())
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-5)
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-5)
    # a checkpoint without projections whose config says it has them: PEFT's error, then ours
    config = tmp_path / "peft" / "adapter_config.json"
    config.write_text(config.read_text().replace('"save_projection": false', '"save_projection": true'))
    message = "projection tensors from state dictionary however they were not present"
    with pytest.raises(ValueError, match=message):
        peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))
    with pytest.raises(ValueError, match=message):
        fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"))


def test_several_adapters_merge_against_w0_and_delete():
    reference, gm, model = pair()
    kwargs = dict(target_modules=TARGETS, sparse_rate=0.1, progressbar=False, init_weights=False)
    torch.manual_seed(1)
    reference.add_adapter("other", peft.FrodConfig(**kwargs))
    torch.manual_seed(1)
    gm.add_adapter("other", fxpeft.FrodConfig(**kwargs))
    with pytest.raises(ValueError, match="initialization key must be the same"):
        gm.add_adapter("bad", fxpeft.FrodConfig(target_modules=TARGETS, projection_prng_key=1))
    with pytest.raises(ValueError, match="saved for all adapters or none"):
        gm.add_adapter("bad", fxpeft.FrodConfig(target_modules=TARGETS, save_projection=False))
    for name, param in gm.named_parameters():
        if "frod_" in name:
            torch.testing.assert_close(param, reference.base_model.model.get_parameter(name))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference.base_model.set_adapter(["default", "other"])
        gm.set_adapter(["default", "other"])
        expected = reference(x())
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)
        gm.merge_adapter()  # both against the weight before either was merged, as PEFT's merge
        reference.merge_adapter()
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-5)
        gm.unmerge_adapter()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, weights[key], rtol=1e-5, atol=1e-6)
    gm.delete_adapter("default")
    assert sorted(k for k in gm.state_dict() if "frod_V" in k) == ["frod_V.fc1.other", "frod_V.fc2.other"]
    gm.delete_adapter("other")
    assert "frod_V" not in gm._modules
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), model(x()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(sparse_rate=1.5), "`sparse_rate` should be between 0 and 1"),
    (dict(sparse_rate=-0.1), "`sparse_rate` should be between 0 and 1"),
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
])
def test_invalid_configs_raise_as_peft(kwargs, message):
    with pytest.raises(ValueError, match=message):
        peft.FrodConfig(target_modules=TARGETS, **kwargs)
    with pytest.raises(ValueError, match=message):
        fxpeft.FrodConfig(target_modules=TARGETS, **kwargs)


def test_half_precision_base_has_peft_tensors():
    kwargs = dict(target_modules=TARGETS, sparse_rate=0.1, progressbar=False, init_weights=False)
    assert_half_precision_like_peft(models.MLP().eval().to(torch.bfloat16), fxpeft.FrodConfig(**kwargs),
                                    peft.FrodConfig(**kwargs), "frod_", x().to(torch.bfloat16))


def test_other_layers_and_weighted_adapters_are_refused():
    with pytest.raises(ValueError, match="does not support"):  # PEFT: TypeError, linear layers only
        fxpeft.transform(models.ConvNet().eval(), fxpeft.FrodConfig(target_modules=["conv1"]))
    reference, gm, _ = pair()
    assert_no_weighted_adapter(gm, reference)  # PEFT's FrodModel has no add_weighted_adapter
