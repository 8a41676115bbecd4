"""Compile time: whole-model torch.compile vs regional compilation (fxpeft.compile_blocks), and
gradient checkpointing's activation memory, fxpeft vs PEFT.

Same Llama-shaped model as bench_lora.py (hidden 512, 4 layers, LoRA r=16 on all seven
projections), batch 4 x 128. Compile time is the first training step (forward + backward) after
torch.compile, measured from a cold dynamo cache (each contender in a fresh process would be
fairer still; the caches are reset between contenders here). Run:
python benchmarks/bench_compile.py [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import fxpeft
from bench_lora import TARGETS, llama_512


def first_step_seconds(run, inputs) -> float:
    torch._dynamo.reset()
    start = time.perf_counter()
    run(**inputs, labels=inputs["input_ids"]).loss.backward()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def saved_activation_bytes(module, inputs) -> int:
    """Bytes autograd keeps for backward, parameters excluded, each storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = module(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    return sum(seen.values())


def main():
    import peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = llama_512().to(args.device)
    inputs = {"input_ids": torch.randint(0, 8000, (4, 128), device=args.device),
              "attention_mask": torch.ones(4, 128, dtype=torch.long, device=args.device)}
    config = dict(r=16, target_modules=TARGETS)

    whole = fxpeft.transform(base, fxpeft.LoraConfig(**config)).train()
    regional = copy.deepcopy(whole)
    fxpeft.compile_blocks(regional)
    times = {"whole model torch.compile": first_step_seconds(torch.compile(whole), inputs),
             "fxpeft.compile_blocks": first_step_seconds(regional, inputs)}
    for label, seconds in times.items():
        print(f"{label:<32}{seconds:>8.1f} s to the first training step")
    print(f"{'regional / whole':<32}{times['fxpeft.compile_blocks'] / times['whole model torch.compile']:>8.2f}")

    ours = fxpeft.transform(base, fxpeft.LoraConfig(**config)).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config)).train()
    plain = saved_activation_bytes(ours, inputs)
    ours.gradient_checkpointing_enable()
    theirs.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mib = 2 ** 20
    checkpointed, reference = saved_activation_bytes(ours, inputs), saved_activation_bytes(theirs, inputs)
    print(f"activations kept for backward: no checkpointing {plain / mib:.1f} MiB, fxpeft checkpointing "
          f"{checkpointed / mib:.1f} MiB, PEFT checkpointing {reference / mib:.1f} MiB "
          f"(fxpeft / PEFT {checkpointed / reference:.2f})")


if __name__ == "__main__":
    main()
