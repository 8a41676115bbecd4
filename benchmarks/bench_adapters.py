"""Many adapters: mixed-adapter batches and adapter switching, fxpeft vs PEFT in one process.

Llama-shaped CPU model (hidden 512, 4 layers), 8 LoRA adapters (r=16, all seven projections).
- mixed batch of 32 sequences x --seq tokens (default 64), each sample naming its adapter (eager, no_grad);
- switching: set_adapter then the next call of a torch.compile'd model (PEFT recompiles;
  PEFT's hotswap_adapter is shown too).
Run: python benchmarks/bench_adapters.py [--repeats N] [--skip-switch]
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

import fxpeft
from bench_lora import TARGETS, interleaved, llama_512

N_ADAPTERS = 8


def build(base):
    import peft

    names = [f"task{i}" for i in range(N_ADAPTERS)]
    configs = {n: dict(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False) for n in names}
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    gm = fxpeft.transform(base, fxpeft.LoraConfig(**configs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        reference.add_adapter(name, peft.LoraConfig(**configs[name]))
        fxpeft.add_adapter(gm, fxpeft.LoraConfig(**configs[name]), name)
    ours = dict(gm.named_parameters())
    with torch.no_grad():
        for key, value in reference.named_parameters():
            if "lora_" in key:
                ours[key.removeprefix("base_model.model.")].copy_(value)
    return names, reference.eval(), gm.eval()


def mixed_batch(names, reference, gm, repeats, seq):
    batch = {"input_ids": torch.randint(0, 8000, (32, seq)), "attention_mask": torch.ones(32, seq, dtype=torch.long)}
    per_sample = [names[i % len(names)] for i in range(32)]
    with torch.no_grad():
        torch.testing.assert_close(gm(**batch, adapter_names=per_sample).logits,
                                   reference(**batch, adapter_names=per_sample).logits, rtol=1e-4, atol=1e-4)
        fxpeft.set_adapter(gm, names[0])
        return interleaved({
            "fxpeft mixed": lambda: gm(**batch, adapter_names=per_sample),
            "peft mixed": lambda: reference(**batch, adapter_names=per_sample),
            "fxpeft single": lambda: gm(**batch),
        }, repeats)


def switching(names, reference, gm, repeats):
    from peft.utils.hotswap import hotswap_adapter

    inputs = {"input_ids": torch.randint(0, 8000, (1, 32)), "attention_mask": torch.ones(1, 32, dtype=torch.long)}
    ours = torch.compile(gm, fullgraph=True)
    theirs = torch.compile(reference)
    saved = tempfile.mkdtemp()
    reference.save_pretrained(saved, selected_adapters=[names[1]])
    with torch.no_grad():
        ours(**inputs)
        theirs(**inputs)
        samples = {"fxpeft set_adapter": [], "peft set_adapter": [], "peft hotswap": []}
        for step in range(repeats):
            name = names[step % 2 + 1]
            start = time.perf_counter()
            fxpeft.set_adapter(gm, name)
            ours(**inputs)
            samples["fxpeft set_adapter"].append(time.perf_counter() - start)
            start = time.perf_counter()
            reference.set_adapter(name)
            theirs(**inputs)
            samples["peft set_adapter"].append(time.perf_counter() - start)
        reference.set_adapter(names[0])
        theirs(**inputs)
        for _ in range(repeats):
            start = time.perf_counter()
            hotswap_adapter(reference, f"{saved}/{names[1]}", adapter_name=names[0])
            theirs(**inputs)
            samples["peft hotswap"].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-switch", action="store_true")
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    names, reference, gm = build(llama_512().eval())
    times = mixed_batch(names, reference, gm, args.repeats, args.seq)
    print(f"mixed batch (32 x {args.seq} tokens, {N_ADAPTERS} adapters), median seconds:")
    for key, value in times.items():
        print(f"  {key:<16}{value:.4f}")
    print(f"  throughput fxpeft / PEFT        : {times['peft mixed'] / times['fxpeft mixed']:.2f}x")
    print(f"  fxpeft mixed / fxpeft single    : {times['fxpeft mixed'] / times['fxpeft single']:.2f}x")
    if not args.skip_switch:
        switch = switching(names, reference, gm, args.repeats)
        print("switch adapter + next compiled call (batch 1 x 32), median seconds:")
        for key, value in switch.items():
            print(f"  {key:<20}{value:.4f}")


if __name__ == "__main__":
    main()
