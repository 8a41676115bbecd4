"""PEFT checkpoint format both ways, against the installed peft package."""
from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import fxpeft
import models
from peft_oracle import assert_same_saved_tensors, peft_model


def _task(name):
    return {"bert": "SEQ_CLS", "vit": None, "t5": "SEQ_2_SEQ_LM"}.get(name, "CAUSAL_LM")


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name", list(models.HF_MODELS))
def test_peft_saves_fxpeft_loads_and_back(name, tmp_path):
    model = models.HF_MODELS[name]().eval()
    kwargs = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type=_task(name))
    reference = peft_model(model, **kwargs)
    reference.save_pretrained(tmp_path / "peft")
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"))
    assert not any(p.requires_grad for p in gm.parameters())  # is_trainable=False
    inputs = models.hf_inputs(name, batch=2, seq=6)
    with torch.no_grad():
        torch.testing.assert_close(_logits(gm(**inputs)), _logits(reference(**inputs)), rtol=1e-5, atol=1e-5)

    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    ours = load_file(tmp_path / "fx" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert set(ours) == set(theirs)
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "fx"))
    with torch.no_grad():
        torch.testing.assert_close(_logits(reloaded(**inputs)), _logits(gm(**inputs)), rtol=1e-5, atol=1e-5)
    config = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_key_sets_match_peft_for_bias_modes_embeddings_and_saved_modules(bias, tmp_path):
    model = models.bert().eval()
    kwargs = dict(r=2, target_modules=["query", "value", "word_embeddings"], bias=bias, task_type="SEQ_CLS",
                  modules_to_save=["pooler.dense"], init_lora_weights=False)
    reference = peft_model(model, **kwargs)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)  # every trained tensor differs from its init
    reference.save_pretrained(tmp_path / "peft")
    gm = fxpeft.from_pretrained(copy.deepcopy(model), str(tmp_path / "peft"), is_trainable=True)
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"))
    assert_same_saved_tensors(tmp_path / "peft", tmp_path / "fx")
    inputs = models.hf_inputs("bert")
    with torch.no_grad():
        torch.testing.assert_close(gm(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)
    assert fxpeft.trainable_parameters(gm) == reference.get_nb_trainable_parameters()


def test_custom_model_and_bin_checkpoints(tmp_path):
    model = models.TinyDecoder().eval()
    kwargs = dict(r=2, target_modules=["embed", "qkv", "down"], init_lora_weights=False)
    reference = peft_model(model, **kwargs)
    with torch.no_grad():
        for n, p in reference.named_parameters():
            if "lora_embedding_A" in n:
                p.normal_()
    reference.save_pretrained(tmp_path / "peft", safe_serialization=False)
    assert (tmp_path / "peft" / "adapter_model.bin").exists()
    gm = fxpeft.from_pretrained(model, str(tmp_path / "peft"))
    ids = torch.randint(0, models.VOCAB, (2, 7))
    torch.testing.assert_close(gm(ids), reference(ids), rtol=1e-5, atol=1e-5)
    fxpeft.save_pretrained(gm, str(tmp_path / "fx"), safe_serialization=False)
    theirs = torch.load(tmp_path / "peft" / "adapter_model.bin", weights_only=True)
    ours = torch.load(tmp_path / "fx" / "adapter_model.bin", weights_only=True)
    assert set(ours) == set(theirs)


def test_several_adapters_layout_and_load_adapter(tmp_path):
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=3, target_modules=["v_proj"], init_lora_weights=False), "other")
    fxpeft.save_pretrained(gm, str(tmp_path))
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "other" / "adapter_config.json").exists()
    reference = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path))
    reference.load_adapter(str(tmp_path / "other"), adapter_name="other")
    for adapter in ("default", "other"):
        reference.set_adapter(adapter)
        single = fxpeft.from_pretrained(model, str(tmp_path / ("" if adapter == "default" else adapter)))
        inputs = models.hf_inputs("llama")
        with torch.no_grad():
            torch.testing.assert_close(single(**inputs).logits, reference(**inputs).logits, rtol=1e-5, atol=1e-5)

    loaded = fxpeft.from_pretrained(model, str(tmp_path))
    fxpeft.load_adapter(loaded, str(tmp_path / "other"), "other")
    assert loaded.model.layers[0].self_attn.v_proj.lora_A.other.weight.shape == (3, 32)
    torch.testing.assert_close(loaded.model.layers[0].self_attn.v_proj.lora_A.other.weight,
                               gm.model.layers[0].self_attn.v_proj.lora_A.other.weight)


def test_bad_checkpoints_fail_cleanly(tmp_path):
    model = models.llama().eval()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fxpeft.from_pretrained(model, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        fxpeft.from_pretrained(model, str(tmp_path / "empty"))

    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    fxpeft.save_pretrained(gm, str(tmp_path / "good"))
    weights = tmp_path / "good" / "adapter_model.safetensors"
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert all(flags.values())

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted"):
        fxpeft.from_pretrained(model, str(corrupt))

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "adapter_config.json").write_text((tmp_path / "good" / "adapter_config.json").read_text())
    tensors = load_file(weights)
    key = next(k for k in tensors if "lora_A" in k)
    tensors[key] = torch.zeros(5, 32)
    save_file(tensors, wrong / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=rf"{key}.*\(5, 32\).*\(2, 32\)"):
        fxpeft.from_pretrained(model, str(wrong))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags

    before = {n for n, _ in gm.named_parameters()}
    with pytest.raises(ValueError, match=rf"{key}"):
        fxpeft.load_adapter(gm, str(wrong), "second")
    assert {n for n, _ in gm.named_parameters()} == before and "second" not in gm.peft_config

    config = json.loads((tmp_path / "good" / "adapter_config.json").read_text())
    (tmp_path / "ia3").mkdir()
    # every PEFT type has a method; a type this fxpeft does not know (a later PEFT's) is refused, naming it
    assert {t.value for t in peft.PeftType} <= set(fxpeft.registry.DEFAULT.config_types())
    unsupported = "SOME_LATER_TYPE"
    (tmp_path / "ia3" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": unsupported}))
    with pytest.raises(NotImplementedError, match=unsupported):
        fxpeft.from_pretrained(model, str(tmp_path / "ia3"))
    (tmp_path / "replicated").mkdir()
    (tmp_path / "replicated" / "adapter_config.json").write_text(json.dumps({**config, "use_qalora": True}))
    with pytest.raises(NotImplementedError, match="use_qalora"):
        fxpeft.from_pretrained(model, str(tmp_path / "replicated"))
    (tmp_path / "newer").mkdir()
    (tmp_path / "newer" / "adapter_config.json").write_text(json.dumps({**config, "some_future_field": 3}))
    (tmp_path / "newer" / "adapter_model.safetensors").write_bytes(weights.read_bytes())
    with pytest.warns(UserWarning, match="some_future_field"):
        fxpeft.from_pretrained(model, str(tmp_path / "newer"))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = models.MLP()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    fxpeft.save_pretrained(gm, str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")
    import safetensors.torch
    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with torch.no_grad():
        gm.fc1.lora_B.default.weight.add_(1)
    with pytest.raises(OSError, match="disk full"):
        fxpeft.save_pretrained(gm, str(tmp_path))
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # the previous checkpoint is intact, no temporary left behind


@pytest.mark.parametrize("targets", ["all-linear", None])
def test_saved_config_resolves_targets_like_peft(targets, tmp_path):
    model = models.llama().eval()
    peft_model(model, r=2, target_modules=targets).save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=targets)), str(tmp_path / "fx"))
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["target_modules"]
    ours = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())["target_modules"]
    assert sorted(ours) == sorted(theirs)
