"""DeLoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package:
rank_pattern / lambda_pattern, the frozen weight norm, dropout in training, and the inputs PEFT refuses."""
from __future__ import annotations

import copy

import peft
import pytest
import torch

import fxpeft
import models


def pair(build=models.MLP, seed=0, **kwargs):
    model = build().eval()
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.DeloraConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.DeloraConfig(**kwargs)).eval()
    return reference, gm, model


def test_patterns_and_initial_draws_are_peft():
    """rank_pattern and lambda_pattern pick per-layer r and λ as PEFT; the same seed draws PEFT's A and B."""
    reference, gm, _ = pair(target_modules=["fc1", "fc2"], r=4, init_weights=False, rank_pattern={"fc2": 2},
                            lambda_pattern={"fc1": 3})
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters() if "delora_" in n}
    ours = {n: p for n, p in gm.named_parameters() if "delora_" in n}
    assert set(ours) == set(theirs)
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name
    assert gm.fc2.delora_A["default"].shape == (2, 24)
    assert gm.fc1.delora_lambda["default"].item() == 3 and gm.fc2.delora_lambda["default"].item() == 15
    x = torch.randn(4, 12)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), reference(x), rtol=1e-5, atol=1e-5)


def test_weight_norm_is_fixed_at_creation_and_saved(tmp_path):
    """w_norm is the column norms of W when the adapter is made: merging (which changes W) does not move
    it, and a checkpoint carries it (a model whose weights changed since still computes the saved one)."""
    reference, gm, model = pair(target_modules=["fc1"], r=4, init_weights=False)
    torch.testing.assert_close(gm.fc1.delora_w_norm["default"], model.fc1.weight.detach().norm(dim=0))
    x = torch.randn(4, 12)
    with torch.no_grad():
        expected = gm(x)
        gm.merge_adapter()
        torch.testing.assert_close(gm.fc1.delora_w_norm["default"], reference.base_model.model.fc1.delora_w_norm["default"])
        gm.unmerge_adapter()
        fxpeft.save_pretrained(gm, str(tmp_path))
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
        changed = copy.deepcopy(model)
        changed.fc1.weight.mul_(2)
        loaded = fxpeft.from_pretrained(changed, str(tmp_path))
        torch.testing.assert_close(loaded.fc1.delora_w_norm["default"], gm.fc1.delora_w_norm["default"])
        reference.save_pretrained(tmp_path / "peft")
        gm.load_adapter(str(tmp_path / "peft"), "theirs")
        torch.testing.assert_close(gm.fc1.delora_w_norm["theirs"], reference.base_model.model.fc1.delora_w_norm["default"])


@pytest.mark.parametrize("kwargs, named", [(dict(target_modules="fc.*", layers_to_transform=[0]), "layers_to_transform"),
                                           (dict(layers_pattern="h"), "layers_to_transform"),
                                           (dict(r=0), "positive integer")])
def test_bad_configs_raise_at_construction_as_peft(kwargs, named):
    for config_type in (peft.DeloraConfig, fxpeft.DeloraConfig):
        with pytest.raises(ValueError, match=named):
            config_type(**{"target_modules": ["fc1"], **kwargs})


@pytest.mark.parametrize("kwargs, named", [(dict(rank_pattern={"fc1": 0}), "positive integer"),
                                           (dict(module_dropout=1.5), "module_dropout"),
                                           (dict(bias="lora_only"), "bias")])
def test_what_peft_accepts_and_fails_on_later_raises_at_construction(kwargs, named):
    with pytest.raises(ValueError, match=named):
        fxpeft.DeloraConfig(target_modules=["fc1"], **kwargs)
