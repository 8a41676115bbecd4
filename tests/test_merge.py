"""Folding passes: merge / unmerge, merge_and_unload, unload, export_merged."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

import fxpeft
import models
from peft_oracle import copy_adapter_weights, peft_model

LAYOUTS = {  # site layouts: Linear, transposed Conv1D, Conv2d, Embedding
    "llama": (models.llama, dict(target_modules="all-linear")),
    "gpt2": (models.gpt2, dict(target_modules=["c_attn", "c_fc", "c_proj"])),
    "convnet": (models.ConvNet, dict(target_modules=["conv1", "conv2", "head"])),
    "decoder": (models.TinyDecoder, dict(target_modules=["embed", "qkv", "down"])),
}


def _inputs(name):
    if name in models.HF_MODELS:
        return (), models.hf_inputs(name)
    return models.CUSTOM_MODELS[name][1](), {}


def _out(module, args, kwargs):
    out = module(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def _randomize_adapters(gm):
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_merge_unmerge_round_trip(name):
    factory, kwargs = LAYOUTS[name]
    model = factory().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, lora_alpha=4, **kwargs))
    _randomize_adapters(gm)
    args, call_kwargs = _inputs("decoder" if name == "decoder" else name)
    base_weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        adapted = _out(gm, args, call_kwargs)
        fxpeft.merge_adapter(gm)
        assert any(not torch.equal(v, base_weights[k]) for k, v in model.state_dict().items())
        torch.testing.assert_close(_out(gm, args, call_kwargs), adapted, rtol=1e-4, atol=1e-5)
        fxpeft.unmerge_adapter(gm)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, base_weights[key], rtol=0, atol=1e-6)
        torch.testing.assert_close(_out(gm, args, call_kwargs), adapted, rtol=1e-5, atol=1e-6)


def test_safe_merge_refuses_broken_adapters_without_touching_weights():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    _randomize_adapters(gm)
    with torch.no_grad():
        gm.model.layers[1].self_attn.v_proj.lora_B.default.weight[0, 0] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        fxpeft.merge_adapter(gm, safe_merge=True)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "t5", "vit"])
def test_merge_and_unload_loads_strict_into_original_class(name):
    factory = models.HF_MODELS[name]
    model = factory().eval()
    task = {"bert": "SEQ_CLS", "t5": "SEQ_2_SEQ_LM", "vit": None}.get(name, "CAUSAL_LM")
    kwargs = dict(r=2, lora_alpha=4, target_modules="all-linear", task_type=task, init_lora_weights=False)
    reference = peft_model(model, **kwargs)
    gm = fxpeft.transform(copy.deepcopy(model), fxpeft.LoraConfig(**kwargs))
    copy_adapter_weights(reference, gm)
    inputs = models.hf_inputs(name)
    with torch.no_grad():
        adapted = gm(**inputs).logits
        merged = fxpeft.merge_and_unload(gm)
        expected = reference.merge_and_unload()(**inputs).logits
    assert not any("fxpeft_rule" in n.meta for n in merged.graph.nodes)
    ops = lambda graph: [(n.op, n.target) for n in graph.nodes]  # noqa: E731
    signature = merged._fxpeft_signatures[merged._fxpeft_primary]  # the base graph: top and every block
    assert signature.outlined is not None
    assert ops(merged.graph) == ops(signature.outlined.top)
    for path, block_graph in signature.outlined.blocks.items():
        assert ops(merged.get_submodule(path).graphs[block_graph.key]) == ops(block_graph.graph)
    assert set(merged.state_dict()) == set(model.state_dict())
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(merged.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(merged(**inputs).logits, adapted, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fresh(**inputs).logits, expected, rtol=1e-4, atol=1e-5)


def test_unload_returns_the_base_model():
    model = models.llama().eval()
    inputs = models.hf_inputs("llama")
    with torch.no_grad():
        base = model(**inputs).logits
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["q_proj"]))
    _randomize_adapters(gm)
    fxpeft.merge_adapter(gm)
    unloaded = fxpeft.unload(gm)
    assert set(unloaded.state_dict()) == set(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(unloaded(**inputs).logits, base, rtol=1e-5, atol=1e-5)


def test_export_merged_runs_without_fxpeft(tmp_path):
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules="all-linear"))
    _randomize_adapters(gm)
    weights_before = {k: v.clone() for k, v in gm.state_dict().items()}
    paths = fxpeft.export_merged(gm, str(tmp_path))
    for key, value in gm.state_dict().items():  # gm itself is untouched
        assert torch.equal(value, weights_before[key])
    from safetensors.torch import load_file
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(load_file(paths["weights"]), strict=True)
    inputs = models.hf_inputs("llama", batch=3, seq=9)
    with torch.no_grad():
        adapted = gm(**inputs).logits
        torch.testing.assert_close(fresh(**inputs).logits, adapted, rtol=1e-4, atol=1e-5)
    torch.save(dict(inputs, expected=adapted), tmp_path / "io.pt")
    script = (
        "import sys; sys.modules['fxpeft'] = None\n"  # any import of fxpeft would fail
        "import torch, transformers\n"
        f"program = torch.export.load({paths['program']!r}).module()\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        "expected = io.pop('expected')\n"
        "out = program(**io)\n"
        "torch.testing.assert_close(out['logits'], expected, rtol=1e-4, atol=1e-5)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=""))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]
