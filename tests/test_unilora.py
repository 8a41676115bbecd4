"""Uni-LoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's θ and
index maps from the seeds, θ kept once and each adapter's own, save_indices files and loading them both ways,
and the inputs PEFT refuses."""
from __future__ import annotations

import copy
import os
import re

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

KWARGS = dict(r=4, theta_d_length=64, target_modules=["fc1", "fc2"], init_weights=False)


def pair(seed: int = 0, **kwargs):
    """PEFT's and fxpeft's Uni-LoRA models, each made after ``torch.manual_seed(seed)`` (θ draws)."""
    model = models.MLP().eval()
    kwargs = {**KWARGS, **kwargs}
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.UniLoraConfig(**kwargs)).eval()
    after_peft = torch.rand(3)
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.UniLoraConfig(**kwargs)).eval()
    assert torch.equal(torch.rand(3), after_peft)  # the global generator is left where PEFT leaves it
    return reference, gm, model


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def test_theta_and_index_maps_are_peft_draws():
    reference, gm, _ = pair(init_weights=True)
    assert torch.equal(gm.unilora_theta_d["default"], reference.base_model.unilora_theta_d["default"])
    for path in ("fc1", "fc2"):
        theirs = reference.base_model.model.get_submodule(path)
        for name in ("unilora_indices_A", "unilora_indices_B", "unilora_scales_A", "unilora_scales_B"):
            assert torch.equal(gm.get_submodule(path)._modules[name]["default"], getattr(theirs, name)["default"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)
    # θ once on the module; without save_indices the maps are not state a checkpoint holds
    assert [k for k in gm.state_dict() if "unilora" in k] == ["unilora_theta_d.default"]
    # a second adapter: its own θ and maps (seeded by its own proj_seed), as PEFT
    for module, config_type in ((reference, peft.UniLoraConfig), (gm, fxpeft.UniLoraConfig)):
        torch.manual_seed(1)
        module.add_adapter("two", config_type(**{**KWARGS, "target_modules": ["fc2"], "proj_seed": 7}))
    assert torch.equal(gm.unilora_theta_d["two"], reference.base_model.unilora_theta_d["two"])
    assert torch.equal(gm.fc2.unilora_indices_B["two"], reference.base_model.model.fc2.unilora_indices_B["two"])
    with torch.no_grad():
        for name in ("two", "default"):
            reference.set_adapter(name)
            gm.set_adapter(name)
            torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)


def test_save_indices_files_and_loading_both_ways(tmp_path):
    reference, gm, model = pair(save_indices=True)
    with torch.no_grad():  # maps the seed does not give: they must travel in the file
        for module in (reference.base_model.model, gm):
            module.fc2.unilora_indices_A["default"].copy_(module.fc2.unilora_indices_A["default"].flip(-1))
            module.fc1.unilora_scales_B["default"].mul_(3)
        expected = reference(x())
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # keys, dtypes, values
    assert "base_model.model.fc2.unilora_indices_A" in load_file(os.path.join(tmp_path / "fx", "adapter_model.safetensors"))
    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-6)
    # without save_indices only θ is saved, as PEFT
    _, gm, _ = pair()
    fxpeft.save_pretrained(gm, str(tmp_path / "theta"))
    assert set(load_file(os.path.join(tmp_path / "theta", "adapter_model.safetensors"))) == {"base_model.unilora_theta_d"}


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(theta_d_length=0), dict(unilora_dropout=1.5),
                                    dict(init_theta_d_bound=0.0), dict(bias="lora_only"),
                                    dict(target_modules="fc.*", layers_to_transform=[0])])
def test_invalid_configs_raise_as_peft(kwargs):
    with pytest.raises(ValueError) as theirs:
        peft.UniLoraConfig(**{**KWARGS, **kwargs})
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        fxpeft.UniLoraConfig(**{**KWARGS, **kwargs})
