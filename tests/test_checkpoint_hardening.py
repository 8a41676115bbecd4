"""Checkpoint hardening: a checkpoint is replaced as a unit, the saved config is PEFT's, and bad
paths and files fail with messages that say what is wrong."""
from __future__ import annotations

import copy
import dataclasses
import json
import os

import peft
import pytest
import torch

import fxpeft
import models
from fxpeft import checkpoint

# --------------------------------------------------------------------------- the config PEFT writes


@pytest.fixture(scope="module")
def saved_bases(tmp_path_factory):
    """Tiny base models saved to a local folder and loaded back, so they carry a real name_or_path."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    root = tmp_path_factory.mktemp("bases")
    models.llama().save_pretrained(root / "llama")
    models.bert().save_pretrained(root / "bert")
    return {"llama": (AutoModelForCausalLM, str(root / "llama")),
            "bert": (AutoModelForSequenceClassification, str(root / "bert"))}


def _base(saved_bases, name):
    auto, path = saved_bases[name]
    return auto.from_pretrained(path).eval()


CASES = {
    "lora-causal-llama": ("llama", "LoraConfig", dict(r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
    "lora-no-task-llama": ("llama", "LoraConfig", dict(r=2, target_modules=["q_proj"])),
    "lora-seqcls-bert": ("bert", "LoraConfig", dict(r=2, task_type="SEQ_CLS")),
    "lora-seqcls-bert-saving": ("bert", "LoraConfig", dict(r=2, task_type="SEQ_CLS", modules_to_save=["classifier"])),
    "prompt-causal-llama": ("llama", "PromptTuningConfig", dict(num_virtual_tokens=3, task_type="CAUSAL_LM")),
    "prompt-seqcls-bert": ("bert", "PromptTuningConfig", dict(num_virtual_tokens=3, task_type="SEQ_CLS")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saved_config_is_the_one_peft_writes(case, saved_bases, tmp_path):
    name, config_name, kwargs = CASES[case]
    model = _base(saved_bases, name)
    peft.get_peft_model(copy.deepcopy(model), getattr(peft, config_name)(**copy.deepcopy(kwargs))) \
        .save_pretrained(tmp_path / "peft")
    fxpeft.save_pretrained(fxpeft.transform(model, getattr(fxpeft, config_name)(**kwargs)), str(tmp_path / "fx"))
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "fx" / "adapter_config.json").read_text())

    def normal(key, value):
        if key == "target_modules" and isinstance(value, list):
            return sorted(value)  # PEFT holds a set: its order is arbitrary
        if key == "modules_to_save" and isinstance(value, list):
            # PEFT appends the task's heads each time a model is wrapped (twice for prompt learning), so
            # its repeats record PEFT's call history; the names and their first order are what loading reads
            return list(dict.fromkeys(value))
        return value

    assert ours["base_model_name_or_path"] == saved_bases[name][1]
    for key in ours:
        assert normal(key, ours[key]) == normal(key, theirs[key]), key
    # what fxpeft leaves out: the version of the PEFT package that wrote the file (fxpeft is not PEFT and
    # claims none), and options fxpeft does not implement, which PEFT writes at their defaults (absent = default)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(getattr(peft, config_name))}
    left_out = sorted(set(theirs) - set(ours) - {"peft_version"})
    assert {key: theirs[key] for key in left_out} == {key: defaults[key] for key in left_out}
    assert set(left_out) <= set(checkpoint.UNSUPPORTED_OPTIONS) | set(checkpoint.IGNORED_FIELDS)


@pytest.mark.parametrize("auto_class, name, config", [
    ("AutoPeftModelForSequenceClassification", "bert", dict(task_type="SEQ_CLS")),
    ("AutoPeftModel", "llama", dict(target_modules=["q_proj"])),  # no task type: the base class from auto_mapping
])
def test_auto_peft_model_loads_fxpeft_checkpoint_with_its_local_base(auto_class, name, config, saved_bases,
                                                                      tmp_path, monkeypatch):
    gm = fxpeft.transform(_base(saved_bases, name), fxpeft.LoraConfig(r=2, init_lora_weights=False, **config)).eval()
    with torch.no_grad():
        for param_name, param in gm.named_parameters():
            if ".modules_to_save." in param_name:  # the trained classifier differs from the base one
                param.add_(0.5)
    fxpeft.save_pretrained(gm, str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reloaded = getattr(peft, auto_class).from_pretrained(str(tmp_path)).eval()
    inputs = models.hf_inputs(name)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, gm(**inputs).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- messages


def test_bad_paths_and_files_say_what_is_wrong(tmp_path):
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    fxpeft.save_pretrained(gm, str(tmp_path / "good"))
    config_file = tmp_path / "good" / "adapter_config.json"
    with pytest.raises(NotADirectoryError, match="is a file, not a checkpoint folder"):
        fxpeft.from_pretrained(models.MLP(), str(config_file))
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        fxpeft.save_pretrained(gm, str(config_file))

    for content in ("[1, 2]", "null", '"LORA"'):
        bad = tmp_path / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "adapter_config.json").write_text(content)
        with pytest.raises(ValueError, match=r"bad/adapter_config.json holds a JSON .*, but an adapter config is a "
                                             r"JSON object"):
            fxpeft.from_pretrained(models.MLP(), str(bad))

    (tmp_path / "good" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="No adapter_model.safetensors or adapter_model.bin"):
        fxpeft.from_pretrained(models.MLP(), str(tmp_path / "good"))


@pytest.mark.parametrize("name", ["a/b", "..", ".", "", "/tmp/fxpeft-outside", "a\\b" if os.sep == "\\" else "a/../b"])
def test_adapter_names_that_are_paths_are_refused_when_saving(name, tmp_path):
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="one plain folder name"):
        checkpoint.save_adapter(gm, checkpoint.adapter_dir(str(tmp_path / "ckpt"), name), name)
    assert list(tmp_path.iterdir()) == [] and not os.path.exists("/tmp/fxpeft-outside")
