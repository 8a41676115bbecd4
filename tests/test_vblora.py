"""VB-LoRA beyond the conformance suite (tests/test_methods.py), against the real PEFT package: PEFT's draws
from a seed, the bank kept once and each adapter's own, save_only_topk_weights files and loading them both
ways, PEFT's savable-parameter count, and the inputs PEFT refuses."""
from __future__ import annotations

import copy
import os

import peft
import pytest
import torch
from safetensors.torch import load_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors

KWARGS = dict(r=4, num_vectors=16, vector_length=4, topk=3, target_modules=["fc1"], init_vector_bank_bound=0.5)


def pair(seed: int = 0, **kwargs):
    """PEFT's and fxpeft's VB-LoRA models, each made after ``torch.manual_seed(seed)``."""
    model = models.MLP().eval()
    kwargs = {**KWARGS, **kwargs}
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.VBLoRAConfig(**kwargs)).eval()
    torch.manual_seed(seed)
    gm = fxpeft.transform(model, fxpeft.VBLoRAConfig(**kwargs)).eval()
    return reference, gm, model


def x():
    return torch.randn(4, 12, generator=torch.Generator().manual_seed(3))


def test_a_seed_gives_peft_weights_and_each_adapter_its_own_bank():
    reference, gm, _ = pair()
    torch.manual_seed(1)
    reference.add_adapter("two", peft.VBLoRAConfig(**{**KWARGS, "topk": 2}))
    torch.manual_seed(1)
    gm.add_adapter("two", fxpeft.VBLoRAConfig(**{**KWARGS, "topk": 2}))
    for adapter in ("default", "two"):
        assert torch.equal(gm.vblora_vector_bank[adapter], reference.base_model.vblora_vector_bank[adapter])
        assert torch.equal(gm.fc1.vblora_logits_B[adapter], reference.base_model.model.fc1.vblora_logits_B[adapter])
    assert [k for k in gm.state_dict() if "vector_bank" in k] == ["vblora_vector_bank.default", "vblora_vector_bank.two"]
    with torch.no_grad():
        for adapter in ("default", "two"):
            reference.set_adapter(adapter)
            gm.set_adapter(adapter)
            torch.testing.assert_close(gm(x()), reference(x()), rtol=1e-5, atol=1e-6)


def test_save_only_topk_weights_files_and_loading_both_ways(tmp_path):
    reference, gm, model = pair(num_vectors=300, save_only_topk_weights=True)  # indices in int16
    with torch.no_grad():
        expected = reference(x())
    reference.save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")  # keys, dtypes, values
    ours = load_file(os.path.join(tmp_path / "fx", "adapter_model.safetensors"))
    assert set(ours) == {
        "base_model.vblora_vector_bank", *(f"base_model.model.fc1.vblora_logits_{m}_topk_{kind}"
                                           for m in "AB" for kind in ("indices", "weights"))}
    assert ours["base_model.model.fc1.vblora_logits_A_topk_indices"].dtype == torch.int16
    assert gm.get_nb_savable_parameters() == reference.get_nb_savable_parameters()
    loaded = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft")).eval()
    back = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx")).eval()
    assert torch.isinf(loaded.fc1.vblora_logits_A["default"]).any()  # -inf but at the top k, as PEFT loads them
    with pytest.warns(UserWarning, match="not for resuming training"):
        loaded.load_adapter(str(tmp_path / "peft"), "trainable", is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(back(x()), expected, rtol=1e-5, atol=1e-6)
        loaded.merge_adapter()
        torch.testing.assert_close(loaded(x()), expected, rtol=1e-5, atol=1e-6)
    # without the option the dense logits are saved, as PEFT
    reference, gm, _ = pair()
    fxpeft.save_pretrained(gm, str(tmp_path / "dense"))
    assert "base_model.model.fc1.vblora_logits_A" in load_file(os.path.join(tmp_path / "dense", "adapter_model.safetensors"))
    assert gm.get_nb_savable_parameters() == reference.get_nb_savable_parameters()


@pytest.mark.parametrize("kwargs", [dict(layers_pattern="layers"), dict(r=0), dict(topk=0), dict(topk=17),
                                    dict(vblora_dropout=1.5), dict(bias="lora_only")])
def test_invalid_configs_raise_at_construction(kwargs):
    with pytest.raises(ValueError):
        fxpeft.VBLoRAConfig(**{**KWARGS, **kwargs})


def test_layers_not_divisible_by_vector_length_raise_as_peft():
    model = models.MLP()
    config = dict(KWARGS, target_modules=["fc1", "fc2"])  # fc2 has 5 outputs
    with pytest.raises(ValueError, match="`out_features` 5 must be divisible by `vector_length` 4"):
        peft.get_peft_model(copy.deepcopy(model), peft.VBLoRAConfig(**config))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`out_features` 5 must be divisible by `vector_length` 4"):
        fxpeft.transform(model, fxpeft.VBLoRAConfig(**config))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())
