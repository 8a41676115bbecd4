"""TinyLoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: weight_tying's
groups of shared v, the seeded projections, save_projection files and loading them both ways, dropout on
embedding sites, and the inputs PEFT refuses."""
from __future__ import annotations

import copy
import os
import re
import warnings

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]  # 8 sites in the tiny Llama


@pytest.fixture(scope="module")
def llama():
    return models.llama().eval()


def pair(model, seed: int = 0, **kwargs):
    """PEFT's and fxpeft's TinyLoRA models, each made after ``torch.manual_seed(seed)`` (v draws)."""
    kwargs = {"r": 4, "u": 8, "target_modules": ATTENTION, "init_weights": "uniform", "init_v_bound": 0.3, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both packages' warnings for save_projection=False
        torch.manual_seed(seed)
        reference = peft.get_peft_model(copy.deepcopy(model), peft.TinyLoraConfig(**kwargs)).eval()
        torch.manual_seed(seed)
        gm = fxpeft.transform(model, fxpeft.TinyLoraConfig(**kwargs)).eval()
    return reference, gm


# weight_tying 0.5: 4 groups of 2 sites; 0.3: round(8 · 0.7) = 6 groups of 1, the last taking the last 3 sites
@pytest.mark.parametrize("weight_tying, groups", [(0.3, 6), (0.5, 4), (1.0, 1)])  # 0.0: tests/test_methods.py
def test_weight_tying_groups_and_projections_are_peft(llama, weight_tying, groups, tmp_path):
    reference, gm = pair(llama, weight_tying=weight_tying)
    assert sorted(gm.tinylora_v["default"].keys()) == sorted(reference.base_model.tinylora_v["default"].keys())
    assert len(gm.tinylora_v["default"]) == groups
    for key, v in gm.tinylora_v["default"].items():
        assert torch.equal(v, reference.base_model.tinylora_v["default"][key])
    last = "model.layers.1.self_attn.o_proj"
    assert torch.equal(gm.get_submodule(last).tinylora_P["default"],
                       reference.base_model.model.get_submodule(last).tinylora_P["default"])
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    fxpeft.save_pretrained(gm, str(tmp_path))
    saved = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert {k for k in saved if "tinylora_v" in k} == {f"base_model.tinylora_v.{g}" for g in range(groups)}


@pytest.mark.parametrize("save_projection", [True, False])
def test_files_and_loading_both_ways(save_projection, tmp_path):
    model = models.MLP().eval()
    reference, gm = pair(model, target_modules=["fc1", "fc2"], save_projection=save_projection)
    x = torch.randn(4, 12)
    with torch.no_grad():
        if save_projection:  # projections the seed does not give: they must travel in the file
            reference.base_model.model.fc2.tinylora_P["default"].mul_(-2)
            gm.fc2.tinylora_P["default"].mul_(-2)
        expected = reference(x)
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # keys, dtypes, values
    ours = load_file(os.path.join(tmp_path / "fx", "adapter_model.safetensors"))
    assert ("base_model.model.fc2.tinylora_P" in ours) == save_projection and "base_model.model.fc2.tinylora_A" in ours
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
        back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x), expected, rtol=1e-5, atol=1e-6)


def test_embedding_dropout_follows_train_and_eval():
    """PEFT drops out B's rows for the ids (rank space) at embedding sites: same draws, same outputs."""
    model = models.TinyDecoder().eval()
    reference, gm = pair(model, target_modules=["embed"], tinylora_dropout=0.5)
    ids = torch.randint(0, models.VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), reference(ids), rtol=1e-5, atol=1e-5)
        reference.train()
        gm.train()
        torch.manual_seed(4)
        expected = reference(ids)
        torch.manual_seed(4)
        torch.testing.assert_close(gm(ids), expected, rtol=1e-5, atol=1e-5)
        assert (gm(ids) - expected).abs().max() > 1e-4  # other draws: the dropout acts


@pytest.mark.parametrize("kwargs", [dict(r=0), dict(u=0), dict(weight_tying=1.5), dict(layers_pattern="layers")])
def test_invalid_configs_raise_as_peft(kwargs):
    with pytest.raises(ValueError) as theirs:
        peft.TinyLoraConfig(target_modules=["fc1"], **kwargs)
    with pytest.raises(ValueError, match=re.escape(str(theirs.value))):
        fxpeft.TinyLoraConfig(target_modules=["fc1"], **kwargs)
    with pytest.raises(ValueError, match="init_weights"):  # PEFT leaves v unset for an unknown value
        fxpeft.TinyLoraConfig(target_modules=["fc1"], init_weights="gaussian")


def test_adapters_must_agree_on_save_projection():
    reference, gm = pair(models.MLP(), target_modules=["fc1"])
    other = dict(target_modules=["fc1"], save_projection=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TypeError, match="saved for all adapters or none"):
            reference.add_adapter("two", peft.TinyLoraConfig(**other))
        with pytest.raises(TypeError, match="saved for all adapters or none"):
            gm.add_adapter("two", fxpeft.TinyLoraConfig(**other))
    assert list(gm.peft_config) == ["default"] and list(gm.tinylora_v.keys()) == ["default"]
