"""QLoRA: peak memory and step time of a training step, fxpeft vs PEFT, on the Llama-shaped model
(hidden 512, 4 layers, vocab 8000; nf4 4-bit base, LoRA r=16 on all seven projections, batch 4 x 128).

Memory: each contender runs in a fresh subprocess (peak RSS is per process). After setup
(model built and quantized, the float copy dropped, freed memory trimmed) the peak-RSS mark is
reset (Linux ``/proc/self/clear_refs``) and a few training steps run; reported are the
resident memory after setup and the peak during the steps. On a GPU the same figures come
from ``torch.cuda.max_memory_allocated``. Time: the QLoRA contenders interleaved in one
process, medians, as a ratio. Graph breaks: ``torch._dynamo.explain``.

Run: python benchmarks/bench_qlora.py [--steps N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_lora import TARGETS, interleaved, llama_512, train_step  # noqa: E402

import fxpeft  # noqa: E402

CONTENDERS = ("fxpeft-lora-fp32", "fxpeft-qlora", "peft-lora-fp32", "peft-qlora")
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def make_inputs(device):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 8000, (4, 128), generator=g).to(device),
            "attention_mask": torch.ones(4, 128, dtype=torch.long, device=device)}


def build(name: str, float_dir: str, device: str):
    """A contender's model, its float original already dropped."""
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    torch.manual_seed(0)
    if name.startswith("fxpeft"):
        model = LlamaForCausalLM.from_pretrained(float_dir).to(device)
        configs = [fxpeft.BnbConfig(**BNB)] if name.endswith("qlora") else []
        return fxpeft.transform(model, configs + [fxpeft.LoraConfig(**lora)]).train()
    if name.endswith("qlora"):
        model = LlamaForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**BNB),
                                                 device_map=device)
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = LlamaForCausalLM.from_pretrained(float_dir).to(device)
    return peft.get_peft_model(model, peft.LoraConfig(**lora)).train()


def _rss(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(name: str, float_dir: str, device: str, steps: int) -> dict:
    model = build(name, float_dir, device)
    step = train_step(model, make_inputs(device))
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed float weights to the OS
        resident = _rss("VmRSS")
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak-RSS mark
    for _ in range(steps):
        step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else _rss("VmHWM")
    return {"resident": resident, "peak": peak}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--contender", help=argparse.SUPPRESS)
    parser.add_argument("--float-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.contender:  # child process: one contender's memory
        print(json.dumps(measure(args.contender, args.float_dir, args.device, args.steps)))
        return

    with tempfile.TemporaryDirectory() as float_dir:
        torch.manual_seed(0)
        llama_512().save_pretrained(float_dir)
        memory = {}
        for name in CONTENDERS:
            out = subprocess.run([sys.executable, __file__, "--contender", name, "--float-dir", float_dir,
                                  "--device", args.device, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            memory[name] = json.loads(out.stdout.strip().splitlines()[-1])
        unit = "GPU allocated" if args.device == "cuda" else "RSS"
        print(f"memory ({unit}, MiB)        resident after setup   peak during {args.steps} train steps")
        for name, figures in memory.items():
            print(f"  {name:22s} {figures['resident'] / 2**20:10.1f}   {figures['peak'] / 2**20:10.1f}")
        fx, pf, fp32 = memory["fxpeft-qlora"], memory["peft-qlora"], memory["fxpeft-lora-fp32"]
        print(f"fxpeft QLoRA / PEFT QLoRA peak: {fx['peak'] / pf['peak']:.2f}x   "
              f"fxpeft QLoRA / fxpeft LoRA fp32 peak: {fx['peak'] / fp32['peak']:.2f}x   "
              f"resident: {fx['resident'] / pf['resident']:.2f}x / {fx['resident'] / fp32['resident']:.2f}x")

        inputs = make_inputs(args.device)
        models = {name: build(name, float_dir, args.device) for name in ("fxpeft-qlora", "peft-qlora")}
        times = interleaved({name: train_step(m, inputs) for name, m in models.items()}, args.repeats)
        print(f"QLoRA train step: fxpeft {times['fxpeft-qlora']:.3f} s, PEFT {times['peft-qlora']:.3f} s, "
              f"ratio {times['fxpeft-qlora'] / times['peft-qlora']:.2f}x")
        for name, model in models.items():
            torch._dynamo.reset()
            breaks = torch._dynamo.explain(model)(**inputs).graph_break_count
            print(f"graph breaks under torch.compile, {name}: {breaks}")


if __name__ == "__main__":
    main()
