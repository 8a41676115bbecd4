"""Checkpoint hardening: a checkpoint is replaced as a unit, the saved config is PEFT's, and bad
paths and files fail with messages that say what is wrong."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

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
    known = getattr(fxpeft, config_name).known_fields()
    assert set(left_out) <= known | set(checkpoint.IGNORED_FIELDS)


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


# --------------------------------------------------------------------------- replacing a checkpoint as a unit


UNIT = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _unit(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in UNIT if (folder / name).exists()}


def _mlp_with_two_adapters():
    torch.manual_seed(0)
    gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=3, target_modules=["fc2"], init_lora_weights=False), "other")
    return gm


def _user_files(folder) -> None:
    """What a user keeps beside a checkpoint: PEFT's save_pretrained writes into the folder and leaves them."""
    (folder / "notes.txt").write_text("mine")
    (folder / "data").mkdir()
    (folder / "data" / "rows.csv").write_text("1,2")
    os.symlink("notes.txt", folder / "link")


def _assert_user_files(folder) -> None:
    assert (folder / "notes.txt").read_text() == "mine"
    assert (folder / "data" / "rows.csv").read_text() == "1,2"
    assert os.readlink(folder / "link") == "notes.txt"


class _Probe:
    """Before every call that changes the disk during a save, checks that the checkpoint folder
    holds exactly the old or exactly the new checkpoint, so a crash at any point leaves one of them."""

    def __init__(self, monkeypatch, folder, allowed):
        self.folder, self.allowed, self.calls = folder, allowed, 0
        for owner, name in ((os, "rename"), (os, "replace"), (os, "remove"), (os, "link"), (os, "mkdir"),
                            (os, "symlink"), (os, "fsync"), (os, "chmod"), (checkpoint, "_exchange")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.check()
            return real(*args, **kwargs)
        return call

    def check(self):
        self.calls += 1
        state = _unit(self.folder)
        assert any(state == allowed for allowed in self.allowed), f"mixed checkpoint: {sorted(state)}"
        _assert_user_files(self.folder)


def _old_and_new(tmp_path, **first_save):
    """A saved checkpoint with user files beside it, the module changed since, and the files of the
    default adapter's checkpoint before and after."""
    gm = _mlp_with_two_adapters()
    folder = tmp_path / "ckpt"
    fxpeft.save_pretrained(gm, str(folder), **first_save)
    _user_files(folder)
    old = _unit(folder)
    with torch.no_grad():
        gm.fc1.lora_B.default.weight.add_(1)
    fxpeft.save_pretrained(gm, str(tmp_path / "expected"), adapter_names=["default"])
    return gm, folder, old, _unit(tmp_path / "expected")


def test_overwrite_holds_old_or_new_checkpoint_at_every_step(tmp_path, monkeypatch):
    gm, folder, old, new = _old_and_new(tmp_path, safe_serialization=False)  # the new one changes format too
    old_other = _unit(folder / "other")
    probe = _Probe(monkeypatch, folder, [old, new])
    fxpeft.save_pretrained(gm, str(folder), adapter_names=["default"])
    probe.check()
    assert probe.calls > 5
    assert _unit(folder) == new  # the stale .bin of the old checkpoint went with it
    assert _unit(folder / "other") == old_other  # another adapter's subfolder survives
    _assert_user_files(folder)
    assert [p.name for p in tmp_path.iterdir() if "fxpeft-staging" in p.name] == []


def test_files_written_into_the_folder_during_a_save_are_kept(tmp_path, monkeypatch):
    gm = _mlp_with_two_adapters()
    fxpeft.save_pretrained(gm, str(tmp_path / "ckpt"))
    real = checkpoint._exchange

    def exchange_after_another_writer(staging, target):  # after the folder was linked, before the swap
        (tmp_path / "ckpt" / "late.txt").write_text("late")
        (tmp_path / "ckpt" / "other" / "late.txt").write_text("late too")
        return real(staging, target)
    monkeypatch.setattr(checkpoint, "_exchange", exchange_after_another_writer)
    fxpeft.save_pretrained(gm, str(tmp_path / "ckpt"), adapter_names=["default"])
    assert (tmp_path / "ckpt" / "late.txt").read_text() == "late"
    assert (tmp_path / "ckpt" / "other" / "late.txt").read_text() == "late too"


@pytest.mark.parametrize("why", ["no folder exchange", "mount point"])
def test_in_place_fallback_never_pairs_old_and_new_files(why, tmp_path, monkeypatch):
    """Where folders cannot be swapped (no renameat2 or a filesystem without it; a mount point,
    which cannot be renamed) files are replaced one by one: the folder holds the old checkpoint,
    the new one, or no config (not a checkpoint), never a mix."""
    gm, folder, old, new = _old_and_new(tmp_path)
    if why == "mount point":  # staged inside the folder
        monkeypatch.setattr(os.path, "ismount", lambda path: path == str(folder))
    else:
        monkeypatch.setattr(checkpoint, "_exchange", lambda a, b: False)
    without_config = [{k: v for k, v in state.items() if k != "adapter_config.json"} for state in (old, new)]
    probe = _Probe(monkeypatch, folder, [old, new, *without_config, {}])
    fxpeft.save_pretrained(gm, str(folder), adapter_names=["default"])
    probe.check()
    assert _unit(folder) == new
    _assert_user_files(folder)
    assert [p.name for p in folder.iterdir() if "fxpeft-staging" in p.name] == []


def test_failed_write_leaves_old_checkpoint_that_loads(tmp_path, monkeypatch):
    gm = _mlp_with_two_adapters()
    fxpeft.save_pretrained(gm, str(tmp_path), adapter_names=["default"])
    expected = gm.fc1.lora_B.default.weight.detach().clone()
    with torch.no_grad():
        gm.fc1.lora_B.default.weight.add_(1)

    def crash(*args):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "_exchange", crash)
    with pytest.raises(OSError, match="disk full"):
        fxpeft.save_pretrained(gm, str(tmp_path), adapter_names=["default"])
    monkeypatch.undo()
    loaded = fxpeft.from_pretrained(models.MLP(), str(tmp_path))
    torch.testing.assert_close(loaded.fc1.lora_B.default.weight, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_staging_left_by_a_killed_writer_is_removed_by_the_next_save(tmp_path):
    """A process killed mid-save (here just before the swap) leaves its staging folder and the old
    checkpoint; the next save removes the leftover."""
    folder = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import fxpeft, models
        from fxpeft import checkpoint
        torch.manual_seed(0)
        gm = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
        fxpeft.save_pretrained(gm, {str(folder)!r})
        checkpoint._exchange = lambda a, b: os._exit(3)
        with torch.no_grad():
            gm.fc1.lora_B.default.weight.add_(1)
        fxpeft.save_pretrained(gm, {str(folder)!r})
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 3, result.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.fxpeft-staging-")]
    assert len(leftovers) == 1 and (leftovers[0] / "adapter_model.safetensors").exists()

    torch.manual_seed(0)
    model = models.MLP()
    old = fxpeft.from_pretrained(model, str(folder))  # the folder still is the old checkpoint
    torch.manual_seed(0)
    fresh = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    torch.testing.assert_close(old.fc1.lora_B.default.weight, fresh.fc1.lora_B.default.weight)

    fxpeft.save_pretrained(old, str(folder))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_save_into_the_working_directory_follows_the_new_folder(tmp_path, monkeypatch):
    gm = _mlp_with_two_adapters()
    monkeypatch.chdir(tmp_path)
    fxpeft.save_pretrained(gm, ".", adapter_names=["default"])
    with torch.no_grad():
        gm.fc1.lora_B.default.weight.add_(1)
    fxpeft.save_pretrained(gm, ".", adapter_names=["default"])
    assert os.getcwd() == str(tmp_path.resolve())  # still a live folder, the checkpoint's
    loaded = fxpeft.from_pretrained(models.MLP(), ".")
    torch.testing.assert_close(loaded.fc1.lora_B.default.weight, gm.fc1.lora_B.default.weight)
