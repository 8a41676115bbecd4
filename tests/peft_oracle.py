"""Helpers that use the real PEFT package as the oracle (test-only dependency)."""
from __future__ import annotations

import copy
import os

import peft
import torch

import fxpeft


def peft_model(model, **lora_kwargs):
    """PEFT's LoRA model on a deep copy of ``model``."""
    return peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**lora_kwargs))


def copy_adapter_weights(peft_wrapped, gm, adapter: str = "default") -> int:
    """Copy PEFT's adapter tensors into the fxpeft module (same relative keys). Returns how many."""
    ours = dict(gm.named_parameters())
    copied = 0
    for key, value in peft_wrapped.named_parameters():
        if not value.requires_grad:
            continue
        name = key.removeprefix("base_model.model.")
        assert name in ours, f"PEFT parameter {key} has no fxpeft counterpart {name}"
        with torch.no_grad():
            ours[name].copy_(value)
        copied += 1
    return copied


def adapted_paths(peft_wrapped) -> set[str]:
    from peft.tuners.lora import LoraLayer
    return {name.removeprefix("base_model.model.") for name, m in peft_wrapped.named_modules()
            if isinstance(m, LoraLayer)}


def fx_adapted_paths(gm) -> set[str]:
    return {name for name, m in gm.named_modules() if "lora_A" in m._modules or "lora_embedding_A" in m._modules}


def assert_same_saved_tensors(peft_dir, fx_dir) -> None:
    """The adapter files PEFT and fxpeft wrote hold the same keys and the same tensors."""
    from safetensors.torch import load_file
    theirs = load_file(os.path.join(peft_dir, "adapter_model.safetensors"))
    ours = load_file(os.path.join(fx_dir, "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key])


def same_trainables_and_files(reference, gm, directory) -> set[str]:
    """PEFT's and fxpeft's trainable counts are equal and their files hold the same keys (returned)."""
    from safetensors.torch import load_file
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()
    reference.save_pretrained(os.path.join(directory, "peft"))
    fxpeft.save_pretrained(gm, os.path.join(directory, "fx"))
    keys = set(load_file(os.path.join(directory, "fx", "adapter_model.safetensors")))
    assert keys == set(load_file(os.path.join(directory, "peft", "adapter_model.safetensors")))
    return keys


def lora_pair(model, configs: dict):
    """The same LoRA adapters (``{name: LoraConfig kwargs}``) in PEFT and fxpeft, fxpeft holding
    PEFT's tensors (embedding ones drawn at random); the first adapter active. Both in eval mode."""
    names = list(configs)
    reference = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    gm = fxpeft.transform(model, fxpeft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        reference.add_adapter(name, peft.LoraConfig(**configs[name]))
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(**configs[name]), name)
    with torch.no_grad():
        for key, param in reference.named_parameters():
            if "lora_embedding" in key:
                param.normal_()
    for name in names:
        ours = dict(gm.named_parameters())
        for key, value in reference.named_parameters():
            if f".{name}" in key and "lora_" in key:
                with torch.no_grad():
                    ours[key.removeprefix("base_model.model.")].copy_(value)
    return reference.eval(), gm.eval()


ALL_LINEAR = dict(init_lora_weights=False, target_modules="all-linear")  # B random: the adapters act


def two_adapters_pair(model):
    """:func:`lora_pair` with adapters "a" (r=4) and "b" (r=2) on every linear layer, "a" active."""
    return lora_pair(model, {"a": dict(r=4, lora_alpha=8, **ALL_LINEAR), "b": dict(r=2, lora_alpha=4, **ALL_LINEAR)})


def assert_both_refuse_config(config_name: str, kwargs: dict, rule: str) -> None:
    """fxpeft's and PEFT's ``config_name`` both raise ValueError at construction, naming ``rule``."""
    import pytest
    for package in (fxpeft, peft):
        with pytest.raises(ValueError, match=rule):
            getattr(package, config_name)(**kwargs)


def assert_no_weighted_adapter(gm, reference) -> None:
    """PEFT's tuner offers no add_weighted_adapter; fxpeft refuses too, naming the config, and changes nothing."""
    import pytest
    adapters = list(gm.peft_config)
    weights = [0.5] * len(adapters)
    with pytest.raises(AttributeError, match="add_weighted_adapter"):
        reference.add_weighted_adapter(adapters, weights, "mix")
    with pytest.raises(ValueError, match=type(gm.peft_config[adapters[0]]).__name__):
        fxpeft.add_weighted_adapter(gm, adapters, weights, "mix")
    assert list(gm.peft_config) == adapters


def assert_half_precision_like_peft(model, fx_config, peft_config, prefix: str, inputs) -> None:
    """A half-precision base: after the same seed, fxpeft's adapter tensors whose names hold ``prefix``
    equal PEFT's, values and dtypes (PEFT makes them in the base dtype, then autocasts to float32); the
    outputs are close (PEFT computes the adapter in the base dtype, fxpeft in float32)."""
    reference, gm = seeded_pair(model, fx_config, peft_config)
    # site tensors under base_model.model.<path>, tensors kept once under base_model.<name> (FRoD's bases)
    theirs = {n.removeprefix("base_model.").removeprefix("model."): t for n, t in reference.state_dict().items()}
    checked = 0
    for name, value in gm.state_dict().items():
        if prefix in name:
            assert value.dtype == theirs[name].dtype and torch.equal(value, theirs[name]), name
            checked += 1
    assert checked
    with torch.no_grad():
        torch.testing.assert_close(gm(inputs), reference(inputs), rtol=0, atol=2e-2)


def seeded_pair(model, fx_config, peft_config, seed: int = 0):
    """PEFT's model (on a copy of ``model``) and fxpeft's, each made after ``torch.manual_seed(seed)`` so
    both draw the same initial values; both in eval mode."""
    torch.manual_seed(seed)
    reference = peft.get_peft_model(copy.deepcopy(model), peft_config).eval()
    torch.manual_seed(seed)
    return reference, fxpeft.transform(model, fx_config).eval()


def switched_outputs(reference, gm, inputs, names) -> dict:
    """Logits per adapter as ``set_adapter`` switches both models through ``names``; each equals PEFT's."""
    outputs = {}
    for name in names:
        reference.set_adapter(name)
        gm.set_adapter(name)
        with torch.no_grad():
            outputs[name] = gm(**inputs).logits
            torch.testing.assert_close(outputs[name], reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    return outputs
