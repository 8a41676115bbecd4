"""IA3 beyond the conformance suite (tests/test_methods.py): PEFT's default targets and
feed-forward modules, add_weighted_adapter, the saved config, and merging's refusal of a
near-zero scale."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch

import fxpeft
import models


def _copy_from(reference, gm):
    theirs = {n.removeprefix("base_model.model."): p for n, p in reference.named_parameters()}
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if ".ia3_l." in name:
                param.copy_(theirs[name])


def test_defaults_weighted_adapter_and_saved_config_equal_peft(tmp_path):
    model = models.llama().eval()
    reference = peft.get_peft_model(copy.deepcopy(model), peft.IA3Config(init_ia3_weights=False), adapter_name="a")
    reference.add_adapter("b", peft.IA3Config(init_ia3_weights=False))
    gm = fxpeft.transform(model, fxpeft.IA3Config(init_ia3_weights=False), adapter_name="a")
    gm.add_adapter("b", fxpeft.IA3Config(init_ia3_weights=False))
    _copy_from(reference, gm)
    # PEFT's table for llama: k_proj, v_proj, down_proj; down_proj scales its input
    assert sorted(gm.peft_config["a"].target_modules) == sorted(reference.peft_config["a"].target_modules)
    assert sorted(gm.peft_config["a"].feedforward_modules) == sorted(reference.peft_config["a"].feedforward_modules)
    reference.add_weighted_adapter(["a", "b"], [0.7, 0.4], "mix")
    fxpeft.add_weighted_adapter(gm, ["a", "b"], [0.7, 0.4], "mix")
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        for name in ("a", "b", "mix"):
            reference.set_adapter(name)
            gm.set_adapter(name)
            torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    reference.save_pretrained(tmp_path / "peft", selected_adapters=["mix"])
    gm.save_pretrained(str(tmp_path / "fx"), adapter_names=["mix"])
    theirs = json.loads((tmp_path / "peft" / "mix" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "fx" / "mix" / "adapter_config.json").read_text())
    for key in ("target_modules", "feedforward_modules"):
        assert sorted(ours.pop(key)) == sorted(theirs.pop(key))
    assert {k: v for k, v in ours.items() if k in theirs} == {k: theirs[k] for k in ours if k in theirs}
    assert set(theirs) - set(ours) <= {"peft_version"}


def test_merging_refuses_a_near_zero_scale_and_changes_nothing():
    model = models.MLP().eval()
    gm = fxpeft.transform(model, fxpeft.IA3Config(target_modules=["fc1", "fc2"], feedforward_modules=["fc2"])).eval()
    with torch.no_grad():
        gm.fc2.ia3_l.default[0, 3] = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 12)
    expected = gm(x)
    with pytest.raises(ValueError, match="unmerging divides by them"):
        gm.merge_adapter()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    torch.testing.assert_close(gm(x), expected)


def test_bad_input():
    with pytest.raises(ValueError, match="subset of target_modules"):
        fxpeft.IA3Config(target_modules=["fc1"], feedforward_modules=["fc2"])
    with pytest.raises(ValueError, match="Conv1d"):
        from test_methods import Conv1dNet
        fxpeft.transform(Conv1dNet(), fxpeft.IA3Config(target_modules=["conv1"], feedforward_modules=[]))
    with pytest.raises(ValueError, match="feedforward_modules is None"):
        fxpeft.transform(models.MLP(), fxpeft.IA3Config(target_modules=["fc1"]))
