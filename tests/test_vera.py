"""VeRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: the
projections kept once and shared by every site and adapter, save_projection both ways, PEFT's rules
for several adapters, dropout in training, and the inputs PEFT refuses."""
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

TARGETS = ["fc1", "fc2"]


def pair(build=models.MLP, seed: int = 0, **kwargs):
    """PEFT's and fxpeft's VeRA models, each made after ``torch.manual_seed(seed)`` (λ_d draws)."""
    model = build().eval()
    kwargs = {"r": 4, "target_modules": TARGETS, "init_weights": False, **kwargs}
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.VeraConfig(**kwargs)).eval()
    return reference, gm, model


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def test_projections_are_peft_draws_kept_once_and_shared_by_adapters():
    reference, gm, _ = pair()
    # PEFT's _find_dim: the largest out (24 of fc1) and in (24 of fc2) over the targets
    assert tuple(gm.vera_A["default"].shape) == (4, 24) and tuple(gm.vera_B["default"].shape) == (24, 4)
    assert torch.equal(gm.vera_A["default"], reference.base_model.vera_A["default"])
    assert torch.equal(gm.vera_B["default"], reference.base_model.vera_B["default"])
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)
    # once on the module: no site holds a projection, the state_dict has each once
    keys = [k for k in gm.state_dict() if "vera_A" in k or "vera_B" in k]
    assert keys == ["vera_A.default", "vera_B.default"]
    assert not any("vera_A" in name for name, _ in gm.fc1.named_modules())
    # a later adapter shares the first one's tensors, as in PEFT
    gm.add_adapter("two", fxpeft.VeraConfig(r=4, target_modules=["fc1"]))
    reference.add_adapter("two", peft.VeraConfig(r=4, target_modules=["fc1"]))
    assert gm.vera_A["two"] is gm.vera_A["default"]
    assert torch.equal(reference.base_model.vera_A["two"], gm.vera_A["two"])
    gm.double()  # converted once: still one tensor for both adapters
    assert gm.vera_A["two"] is gm.vera_A["default"] and gm.vera_A["two"].dtype == torch.float64


def test_blocks_read_the_one_root_projection():
    """GPT-2's layers run as block graphs: they read the root's projection itself, not a copy."""
    reference, gm, _ = pair(models.gpt2, target_modules=["c_attn"])
    inputs = models.hf_inputs("gpt2")
    assert fxpeft.blocks.running_blocks(gm)
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
        gm.vera_A["default"].mul_(2)
        reference.base_model.vera_A["default"].mul_(2)
        doubled = reference(**inputs).logits
        torch.testing.assert_close(gm(**inputs).logits, doubled, rtol=1e-5, atol=1e-5)
    assert sum("vera_A" in k for k in gm.state_dict()) == 1


@pytest.mark.parametrize("save_projection", [True, False])
def test_save_projection_files_and_loading_both_ways(save_projection, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's (and fxpeft's) warning for save_projection=False
        reference, gm, model = pair(save_projection=save_projection)
    with torch.no_grad():  # trained vectors, and (saved) projections that the key does not give
        for module in (reference, gm):
            for name, p in module.named_parameters():
                if "vera_lambda" in name:
                    seed = len(name.removeprefix("base_model.model.")) + p.numel()
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        if save_projection:
            reference.base_model.vera_A["default"].mul_(-1.5)
            gm.vera_A["default"].mul_(-1.5)
        expected = reference(x())
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    theirs = load_file(os.path.join(tmp_path / "peft", "adapter_model.safetensors"))
    ours = load_file(os.path.join(tmp_path / "fx", "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    assert ("base_model.vera_A" in ours) == save_projection and ("base_model.vera_B" in ours) == save_projection
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    assert loaded.peft_config["default"].save_projection == save_projection
    assert (len(loaded.state_dict()) - len(model.state_dict())) == 4 + 2 * save_projection
    with torch.no_grad():
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-6)


def test_two_adapters_switch_and_merge_as_peft():
    reference, gm, _ = pair()
    torch.manual_seed(5)
    reference.add_adapter("two", peft.VeraConfig(r=4, target_modules=["fc2"], init_weights=False, d_initial=0.3))
    torch.manual_seed(5)
    gm.add_adapter("two", fxpeft.VeraConfig(r=4, target_modules=["fc2"], init_weights=False, d_initial=0.3))
    with torch.no_grad():
        for name in ("default", "two", "default"):
            reference.set_adapter(name)
            gm.set_adapter(name)
            torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)
        gm.set_adapter("two")
        reference.set_adapter("two")
        gm.merge_adapter()
        reference.merge_adapter()
        torch.testing.assert_close(gm.fc2.weight, reference.base_model.model.fc2.base_layer.weight)


def test_dropout_in_training_draws_as_peft():
    reference, gm, _ = pair(vera_dropout=0.5)
    gm.train(), reference.train()
    for seed in (0, 1):
        torch.manual_seed(seed)
        expected = reference(x())
        torch.manual_seed(seed)
        torch.testing.assert_close(gm(x()), expected, rtol=1e-5, atol=1e-6)
    gm.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("second, rule", [
    (dict(projection_prng_key=1), "PRNG initialisation key must be the same"),
    (dict(save_projection=False), "must be saved for all adapters or none"),
    (dict(r=8), "adapter with a lower rank was added"),
    (dict(r=2), "needs the first one's r"),  # PEFT accepts it, then fails in forward
])
def test_adapters_that_cannot_share_the_projections_raise(second, rule):
    _, gm, _ = pair(target_modules=["fc1"])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    with warnings.catch_warnings(), pytest.raises(ValueError, match=rule):
        warnings.simplefilter("ignore")
        gm.add_adapter("two", fxpeft.VeraConfig(**{"r": 4, "target_modules": ["fc1"], **second}))
    assert list(gm.peft_config) == ["default"] and set(gm.state_dict()) == set(before)


def test_later_adapter_on_a_larger_layer_raises_as_peft():
    model = models.MLP()  # fc1: 12 -> 24, fc2: 24 -> 5
    reference = peft.get_peft_model(copy.deepcopy(model), peft.VeraConfig(r=4, target_modules=["fc2"]))
    with pytest.raises(ValueError, match="vera_B has a size of 5 but 24"):
        reference.add_adapter("two", peft.VeraConfig(r=4, target_modules=["fc1"]))
    gm = fxpeft.transform(model, fxpeft.VeraConfig(r=4, target_modules=["fc2"]))
    with pytest.raises(ValueError, match="vera_B has a size of 5 but 24"):
        gm.add_adapter("two", fxpeft.VeraConfig(r=4, target_modules=["fc1"]))


@pytest.mark.parametrize("kwargs, rule", [
    (dict(layers_pattern="layers"), "`layers_to_transform` must also be specified"),
    (dict(r=0), "positive integer"),
    (dict(vera_dropout=1.5), r"\[0, 1\]"),
    (dict(bias="lora_only"), "'vera_only'"),
])
def test_invalid_configs_raise_naming_the_rule(kwargs, rule):
    with pytest.raises(ValueError, match=rule):
        fxpeft.VeraConfig(target_modules=TARGETS, **kwargs)


def test_non_linear_targets_raise():
    """PEFT's VeRA takes nn.Linear and Conv1D only (a TypeError there)."""
    with pytest.raises(ValueError, match="vera does not support convolution layers"):
        fxpeft.transform(models.ConvNet(), fxpeft.VeraConfig(r=4, target_modules=["conv1"]))


@pytest.mark.parametrize("bias", ["vera_only", "all"])
def test_bias_modes_train_and_save_as_peft(bias, tmp_path):
    from peft_oracle import same_trainables_and_files

    keys = same_trainables_and_files(*pair(target_modules=["fc1"], bias=bias)[:2], str(tmp_path))
    assert "base_model.model.fc1.base_layer.bias" in keys and ("base_model.model.fc2.bias" in keys) == (bias == "all")


def test_checkpoint_and_config_disagreeing_on_projections_load_as_peft(tmp_path):
    """save_projection=False over a file holding projections: PEFT warns and draws them from the key
    (the file's are ignored); save_projection=True over a file without them: PEFT raises."""
    import json

    reference, _, model = pair()
    with torch.no_grad():
        reference.base_model.vera_A["default"].mul_(-2)  # saved projections the key does not give
    reference.save_pretrained(tmp_path / "with")
    config = json.loads((tmp_path / "with" / "adapter_config.json").read_text())
    (tmp_path / "with" / "adapter_config.json").write_text(json.dumps({**config, "save_projection": False}))
    with pytest.warns(UserWarning, match="however they are present"):
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "with")).eval()
    with pytest.warns(UserWarning, match="however they are present"):
        ours = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "with")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x()), theirs(x()), rtol=1e-5, atol=1e-6)
        assert torch.equal(ours.vera_A["default"], theirs.base_model.vera_A["default"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, without, _ = pair(save_projection=False)
    fxpeft.save_pretrained(without, str(tmp_path / "without"))
    config = json.loads((tmp_path / "without" / "adapter_config.json").read_text())
    (tmp_path / "without" / "adapter_config.json").write_text(json.dumps({**config, "save_projection": True}))
    rule = "Specified to load vera_A and vera_B from state dictionary however they were not present"
    with pytest.raises(ValueError, match=rule):
        peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "without"))
    with pytest.raises(ValueError, match=rule):
        fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "without"))
