"""Super-Tuning beyond the conformance suite (tests/test_methods.py), against the real PEFT package:
the magnitude-chosen support (both ends), sparse-only mode, LoRA dropout in training, indices left
out of checkpoints, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models


def pair(seed: int = 0, **kwargs):
    model = models.MLP().eval()
    kwargs = {"sparsity": 0.9, "target_modules": ["fc1", "fc2"], "init_weights": False, **kwargs}
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.SupertuningConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.SupertuningConfig(**kwargs)).eval()
    return reference, gm, model


@pytest.mark.parametrize("kwargs", [dict(), dict(select_top=False, sparsity=0.5)])
def test_sparse_only_support_values_and_outputs_are_peft(kwargs):
    reference, gm, _ = pair(**kwargs)
    for path in ("fc1", "fc2"):
        theirs, ours = reference.base_model.model.get_submodule(path), gm.get_submodule(path)
        assert torch.equal(ours.supertuning_indices["default"], theirs.supertuning_indices["default"])
        assert torch.equal(ours.supertuning_values["default"], theirs.supertuning_values["default"])
        assert "supertuning_lora_A" not in ours._modules
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_lora_dropout_in_training_draws_as_peft():
    reference, gm, _ = pair(r=2, lora_dropout=0.5)
    x = torch.randn(4, 12)
    reference.train(), gm.train()
    torch.manual_seed(5)
    expected = reference(x)
    torch.manual_seed(5)
    torch.testing.assert_close(gm(x), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (gm.eval()(x) - expected).abs().max() > 1e-4  # the dropout acted


def test_indices_left_out_of_checkpoints_are_chosen_again(tmp_path):
    with pytest.warns(UserWarning, match="save_precomputed_indices=False"):
        reference, gm, model = pair(save_precomputed_indices=False)
    with torch.no_grad():
        for path in ("fc1", "fc2"):
            gm.get_submodule(path).supertuning_values["default"].copy_(
                reference.base_model.model.get_submodule(path).supertuning_values["default"])
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    from peft_oracle import assert_same_saved_tensors
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = reference(x)
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-5)
    rule = "indices must be saved for all adapters or none"
    with pytest.raises(ValueError, match=rule):
        reference.add_adapter("other", peft.SupertuningConfig(target_modules=["fc1"]))
    with pytest.raises(ValueError, match=rule):
        gm.add_adapter("other", fxpeft.SupertuningConfig(target_modules=["fc1"]))
    assert list(gm.peft_config) == ["default"]


def test_refused_layers_and_sparsities_as_peft():
    model = models.gpt2()
    with pytest.raises(TypeError, match="only `torch.nn.Linear` is supported"):
        peft.get_peft_model(copy.deepcopy(model), peft.SupertuningConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="Super-Tuning does not support transformers' Conv1D"):
        fxpeft.transform(model, fxpeft.SupertuningConfig(target_modules=["c_attn"]))
    mlp = models.MLP()  # 0.5 % of fc1's 288 entries is one, of fc2's 120 none
    config = dict(sparsity=0.995, target_modules=["fc1", "fc2"])
    with pytest.raises(ValueError, match="leaves no trainable entries"):
        peft.get_peft_model(copy.deepcopy(mlp), peft.SupertuningConfig(**config))
    with pytest.raises(ValueError, match="leaves no trainable entries"):
        fxpeft.transform(mlp, fxpeft.SupertuningConfig(**config))
    assert all(p.requires_grad for p in [*model.parameters(), *mlp.parameters()])


@pytest.mark.parametrize("kwargs, rule", [
    (dict(sparsity=1.0), r"sparsity must be in \[0.0, 1.0\)"),
    (dict(r=0), "r must be a positive integer or None"),
    (dict(lora_alpha=8), "lora_alpha is set but r is None"),
    (dict(r=2, lora_dropout=1.0), r"lora_dropout must be in \[0.0, 1.0\)"),
])
def test_invalid_configs_raise_peft_rule(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        peft.SupertuningConfig(**kwargs)
    with pytest.raises(ValueError, match=rule):
        fxpeft.SupertuningConfig(**kwargs)


def test_add_weighted_adapter_is_refused_as_peft_has_none():
    reference, gm, _ = pair()
    reference.add_adapter("other", peft.SupertuningConfig(sparsity=0.9, target_modules=["fc1"]))
    gm.add_adapter("other", fxpeft.SupertuningConfig(sparsity=0.9, target_modules=["fc1"]))
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    with pytest.raises(ValueError, match="SupertuningConfig"):
        fxpeft.add_weighted_adapter(gm, ["default", "other"], [0.5, 0.5], "mix")
    assert list(gm.peft_config) == ["default", "other"]
