"""The ``fxpeft`` command line (``main``, and once the installed console script) on tiny models saved on disk;
PEFT (its adapters, its outputs) is the oracle."""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models
from fxpeft.cli import main

SITE = "model.layers.0.self_attn.q_proj"
# the console script pip made from [project.scripts]: beside this Python, or on PATH (a --user install)
SCRIPT = Path(sys.executable).parent / "fxpeft"
SCRIPT = str(SCRIPT) if SCRIPT.exists() else shutil.which("fxpeft")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved by transformers, a PEFT LoRA adapter for it saved as .bin and as
    safetensors, and PEFT's logits with that adapter."""
    import peft

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = models.llama().eval()
    model.save_pretrained(root / "model")
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False))  # B random: merging matters
    peft_model.save_pretrained(root / "peft_bin", safe_serialization=False)
    peft_model.save_pretrained(root / "peft_st")
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        logits = peft_model(**inputs).logits
    return root, inputs, logits, peft_model.get_nb_trainable_parameters()[0]


@pytest.fixture(scope="module")
def runs(saved):
    """Every command once: ``info`` as the installed console script (a subprocess, its output on
    pipes), the others through ``main`` in this process (a subprocess each would import torch and
    transformers again)."""
    root = saved[0]
    assert SCRIPT, "no fxpeft console script: install the package (pip install -e .)"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FXPEFT_PROGRESS", None)  # stderr is a pipe: no progress unless asked
    script = subprocess.Popen([SCRIPT, "info", "peft_bin"], cwd=root, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    commands = {
        "convert": ["convert", "peft_bin", "converted"],
        "merge": ["merge", "model", "peft_bin", "merged", "--safe"],
        "export": ["export", "model", "peft_st", "exported"],
        "inspect": ["inspect", "model", "peft_st", "--site", SITE, "--out", "pic.svg"],
    }
    done, here = {}, os.getcwd()
    os.chdir(root)  # the commands take paths relative to the folder, as typed in a shell there
    try:
        for name, args in commands.items():
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
            done[name] = (code, out.getvalue(), err.getvalue())
    finally:
        os.chdir(here)
    out, err = script.communicate(timeout=600)
    done["info"] = (script.returncode, out, err)
    return done


def _ok(runs, name):
    code, out, err = runs[name]
    assert code == 0, err
    assert "fxpeft" not in err and "Loading weights" not in err  # no progress bars on a pipe
    return out


def test_info_describes_the_adapter(saved, runs):
    out = _ok(runs, "info")
    assert "method: LORA" in out and "fxpeft can load it" in out
    assert f"{saved[3]:,d} parameters" in out  # PEFT's own count of the adapter's trainable parameters
    assert f"{SITE}: lora_A.weight 4x32, lora_B.weight 32x4" in out and "4 modules" in out


def test_convert_resaves_bin_as_safetensors(saved, runs):
    from safetensors.torch import load_file

    _ok(runs, "convert")
    root = saved[0]
    original = torch.load(root / "peft_bin" / "adapter_model.bin", weights_only=True)
    converted = load_file(root / "converted" / "adapter_model.safetensors")
    assert converted.keys() == original.keys() and all(torch.equal(converted[k], original[k]) for k in original)
    assert json.loads((root / "converted" / "adapter_config.json").read_text())["r"] == 4


def test_merge_writes_a_folder_the_original_class_loads(saved, runs):
    from transformers import LlamaForCausalLM

    root, inputs, logits, _ = saved
    assert "LlamaForCausalLM.from_pretrained" in _ok(runs, "merge")
    merged = LlamaForCausalLM.from_pretrained(root / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, logits, atol=1e-5, rtol=1e-4)


def test_export_writes_weights_and_a_program(saved, runs):
    root, inputs, logits, _ = saved
    _ok(runs, "export")
    program = torch.export.load(root / "exported" / "model.pt2").module()
    with torch.no_grad():
        torch.testing.assert_close(program(**inputs)["logits"], logits, atol=1e-5, rtol=1e-4)


def test_inspect_prints_the_table_and_draws_the_site(saved, runs):
    out = _ok(runs, "inspect")
    assert "model.layers.1.self_attn.v_proj" in out and "4 rewritten sites" in out
    assert f"+{SITE.replace('.', '_')}_lora_a_default_weight = self.{SITE}.lora_A.default.weight" in out
    svg = (saved[0] / "pic.svg").read_text()
    assert f"{SITE}.lora_B.default.weight" in svg and len(svg) < 100_000


@pytest.mark.parametrize("args, message", [
    (["merge", "{root}/nope", "{root}/peft_bin", "{root}/out"], "nope does not exist; pass the model folder"),
    (["export", "{root}/peft_bin", "{root}/peft_bin", "{root}/out"], "config.json is missing"),
    (["info", "{root}/model"], "adapter_config.json is missing"),
    (["inspect", "{root}/model", "--out", "x.svg"], "pass ADAPTER_DIR too"),
    (["convert", "{root}/model/config.json", "{root}/out"], "is a file; pass the adapter folder"),
])
def test_bad_folders_give_one_line_and_a_failing_status(saved, capsys, args, message):
    assert main([a.format(root=saved[0]) for a in args]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith(f"fxpeft {args[0]}: error:")
    assert not (saved[0] / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "merge", "export", "convert", "info"])
def test_help_on_every_command(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and f"usage: fxpeft {command}" in capsys.readouterr().out
