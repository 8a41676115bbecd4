"""Transform time on a Llama-7B-shaped model built on the meta device (32 layers, hidden 4096),
LoRA r=16 on every linear layer: fxpeft.transform against peft.get_peft_model, side by side in
one process (interleaved, medians); then the time of one ``add_adapter`` as adapters accumulate
(a tiny Llama, LoRA r=8 on q/v, ms per call at 1 and at N loaded: a call must not grow with the
adapters already there). Run: python benchmarks/bench_transform.py [--repeats N] [--adapters N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import fxpeft


def llama_7b_on_meta():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    with torch.device("meta"):
        return LlamaForCausalLM(config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=50, help="adapters added one by one (0 skips)")
    parser.add_argument("--only-adapters", action="store_true", help="only the add_adapter rows")
    args = parser.parse_args()
    if not args.only_adapters:
        transform_times(args.repeats)
    if args.adapters:
        add_adapter_times(args.adapters)


def transform_times(repeats: int) -> None:
    import peft

    contenders = {
        "fxpeft.transform": lambda: fxpeft.transform(llama_7b_on_meta(), fxpeft.LoraConfig(r=16, target_modules="all-linear")),
        "peft.get_peft_model": lambda: peft.get_peft_model(llama_7b_on_meta(),
                                                           peft.LoraConfig(r=16, target_modules="all-linear")),
    }
    build = statistics.median(_seconds(llama_7b_on_meta) for _ in range(repeats))
    samples = {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up: the first torch.export in a process pays one-time costs
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(_seconds(fn) - build)
    for name, values in samples.items():
        print(f"{name:<22}{statistics.median(values):>7.2f} s (building the meta model, {build:.2f} s, excluded)")


def add_adapter_times(count: int) -> None:
    """ms per add_adapter, fxpeft and PEFT side by side (the same adapters, added alternately)."""
    import peft
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4)
    ids = torch.randint(0, 128, (1, 8))
    options = dict(r=8, target_modules=["q_proj", "v_proj"])
    ours = fxpeft.transform(LlamaForCausalLM(config), fxpeft.LoraConfig(**options))
    ours(input_ids=ids)  # captured: add_adapter re-lowers, it does not capture again
    theirs = peft.get_peft_model(LlamaForCausalLM(config), peft.LoraConfig(**options))
    times = {"fxpeft.add_adapter": [], "PEFT add_adapter": []}
    for i in range(1, count):
        times["fxpeft.add_adapter"].append(_seconds(lambda: fxpeft.add_adapter(ours, fxpeft.LoraConfig(**options), f"a{i}")))
        times["PEFT add_adapter"].append(_seconds(lambda: theirs.add_adapter(f"a{i}", peft.LoraConfig(**options))))
    window = max(1, min(5, count // 5))
    for name, values in times.items():
        first, last = statistics.median(values[:window]) * 1e3, statistics.median(values[-window:]) * 1e3
        print(f"{name:<22} {first:6.1f} ms with 1-{window} loaded, {last:6.1f} ms with {count - window}-{count - 1} "
              f"loaded: {last / first:.2f}x")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
