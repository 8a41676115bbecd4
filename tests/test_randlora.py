"""RandLoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: the bases
drawn as PEFT draws them (dense, sparse, very sparse), kept once and shared by later adapters, PEFT's files
with and without save_projection and loading them both ways, and the inputs PEFT refuses."""
from __future__ import annotations

import copy
import os
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

KWARGS = dict(r=4, randlora_alpha=8, target_modules=["fc1", "fc2"], init_weights=False)


def pair(seed: int = 0, **kwargs):
    """PEFT's and fxpeft's RandLoRA models, each made after ``torch.manual_seed(seed)`` (λ draws)."""
    model = models.MLP().eval()
    kwargs = {**KWARGS, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both packages' warning for save_projection=False
        torch.manual_seed(seed)
        reference = peft.get_peft_model(copy.deepcopy(model), peft.RandLoraConfig(**kwargs)).eval()
        torch.manual_seed(seed)
        gm = fxpeft.transform(model, fxpeft.RandLoraConfig(**kwargs)).eval()
    return reference, gm, model


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("kind", [{}, dict(sparse=True), dict(very_sparse=True)])
def test_bases_and_initial_weights_are_peft_draws_kept_once(kind):
    reference, gm, _ = pair(**kind)
    # PEFT's _find_dim: the largest (out, in) over the targets is (24, 24): A (r, 1, 24), B (24, 6, r)
    assert tuple(gm.randlora_A["default"].shape) == (4, 1, 24) and tuple(gm.randlora_B["default"].shape) == (24, 6, 4)
    for name in ("randlora_A", "randlora_B"):
        assert torch.equal(gm._modules[name]["default"], getattr(reference.base_model, name)["default"])
    assert torch.equal(gm.fc2.randlora_lambda["default"], reference.base_model.model.fc2.randlora_lambda["default"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-5)
    assert [k for k in gm.state_dict() if "randlora_A" in k or "randlora_B" in k] == ["randlora_A.default",
                                                                                      "randlora_B.default"]
    # a later adapter shares the first one's bases, as in PEFT
    gm.add_adapter("two", fxpeft.RandLoraConfig(**{**KWARGS, "target_modules": ["fc2"], **kind}))
    reference.add_adapter("two", peft.RandLoraConfig(**{**KWARGS, "target_modules": ["fc2"], **kind}))
    assert gm.randlora_B["two"] is gm.randlora_B["default"]
    assert torch.equal(reference.base_model.randlora_B["two"], gm.randlora_B["two"])


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_and_loading_both_ways(save_projection, tmp_path):
    reference, gm, model = pair(save_projection=save_projection)
    with torch.no_grad():
        if save_projection:  # bases the key does not give: they must travel in the file
            reference.base_model.randlora_B["default"].mul_(-1.5)
            gm.randlora_B["default"].mul_(-1.5)
        expected = reference(x())
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # keys, dtypes, values
    ours = load_file(os.path.join(tmp_path / "fx", "adapter_model.safetensors"))
    # PEFT also saves each layer's reference to the bases
    assert ("base_model.model.fc2.randlora_B" in ours) == ("base_model.randlora_B" in ours) == save_projection
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-5)


def test_later_adapters_follow_peft_rules():
    reference, gm, _ = pair()
    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        reference.add_adapter("two", peft.RandLoraConfig(**{**KWARGS, "projection_prng_key": 1}))
    with pytest.raises(ValueError, match="PRNG initialisation key must be the same"):
        gm.add_adapter("two", fxpeft.RandLoraConfig(**{**KWARGS, "projection_prng_key": 1}))
    with pytest.raises(ValueError, match="lower rank"):
        gm.add_adapter("two", fxpeft.RandLoraConfig(**{**KWARGS, "r": 8}))
    with pytest.raises(ValueError, match="the first one's r"):
        gm.add_adapter("two", fxpeft.RandLoraConfig(**{**KWARGS, "r": 2}))
    assert list(gm.peft_config) == ["default"] and list(gm.randlora_A.keys()) == ["default"]


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(randlora_dropout=2.0), dict(bias="lora_only"),
                                    dict(projection_prng_key="0")])
def test_invalid_configs_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        fxpeft.RandLoraConfig(**{**KWARGS, **kwargs})
