"""QLoRA: memory and step time of a training step, fxpeft vs PEFT, on the Llama-shaped model
(hidden 512, 4 layers, vocab 8000; nf4 4-bit base with double-quantized statistics, LoRA r=16
on all seven projections, batch 4 x 128), with LoRA on the float32 base for reference.

Memory, side by side in one process: bytes the allocator holds for live tensors (CPU: glibc's
``mallinfo2`` in-use bytes, sampled after every op by a dispatch mode so the peak inside
backward is seen; GPU: ``torch.cuda.max_memory_allocated``), relative to before the contender
was built, after one throwaway build and step of the same contender (so one-time process state,
e.g. torch.export's first-use caches, is not counted). "resident" is after setup (the float model it came from dropped), "peak" the
highest point during the training steps (weights, activations, gradients, optimizer state).
Time: the QLoRA contenders interleaved, medians, as a ratio. Graph breaks: ``torch._dynamo.explain``.

Run: python benchmarks/bench_qlora.py [--steps N] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
from bench_lora import TARGETS, interleaved, llama_512, train_step  # noqa: E402

import fxpeft  # noqa: E402

CONTENDERS = ("fxpeft-lora-fp32", "fxpeft-qlora", "peft-lora-fp32", "peft-qlora")
BNB = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)


def make_inputs(device):
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 8000, (4, 128), generator=g).to(device),
            "attention_mask": torch.ones(4, 128, dtype=torch.long, device=device)}


def _in_memory(model):
    """Copy every tensor out of the memory-mapped checkpoint file, so the allocator counts it."""
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.data = tensor.data.clone()
    return model


def build(name: str, float_dir: str, device: str):
    """A contender's model, its float original already dropped."""
    import peft
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    lora = dict(r=16, lora_alpha=32, target_modules=TARGETS)
    torch.manual_seed(0)
    if name.startswith("fxpeft"):
        model = _in_memory(LlamaForCausalLM.from_pretrained(float_dir).to(device))
        configs = [fxpeft.BnbConfig(**BNB)] if name.endswith("qlora") else []
        return fxpeft.transform(model, configs + [fxpeft.LoraConfig(**lora)]).train()
    if name.endswith("qlora"):
        model = _in_memory(LlamaForCausalLM.from_pretrained(float_dir, quantization_config=BitsAndBytesConfig(**BNB),
                                                            device_map=device))
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = _in_memory(LlamaForCausalLM.from_pretrained(float_dir).to(device))
    return peft.get_peft_model(model, peft.LoraConfig(**lora)).train()


class _MallInfo(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


_LIBC = ctypes.CDLL("libc.so.6")
_LIBC.mallinfo2.restype = _MallInfo


def allocated(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    info = _LIBC.mallinfo2()
    return info.uordblks + info.hblkhd  # heap chunks in use + mmapped (large tensors)


class PeakMemory(TorchDispatchMode):
    """The highest allocated bytes seen after any op (CPU has no allocator peak counter)."""

    def __init__(self, device: str):
        super().__init__()
        self.device, self.peak = device, allocated(device)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, allocated(self.device))
        return out


def measure(name: str, float_dir: str, device: str, steps: int) -> dict:
    train_step(build(name, float_dir, device), make_inputs(device))()  # warm-up: one-time process state
    gc.collect()
    before = allocated(device)
    model = build(name, float_dir, device)
    step = train_step(model, make_inputs(device))
    gc.collect()
    resident = allocated(device) - before
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        with PeakMemory(device) as tracker:
            for _ in range(steps):
                step()
        peak = tracker.peak - before
    del model, step
    gc.collect()
    return {"resident": resident, "peak": peak}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as float_dir:
        torch.manual_seed(0)
        llama_512().save_pretrained(float_dir)
        memory = {name: measure(name, float_dir, args.device, args.steps) for name in CONTENDERS}
        print(f"memory (MiB allocated)   resident after setup   peak during {args.steps} train steps")
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
