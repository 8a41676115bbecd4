"""Transform time on a Llama-7B-shaped model built on the meta device (32 layers, hidden 4096),
LoRA r=16 on every linear layer: fxpeft.transform against peft.get_peft_model, side by side in
one process (interleaved, medians). Run: python benchmarks/bench_transform.py [--repeats N]
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
    import peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    contenders = {
        "fxpeft.transform": lambda: fxpeft.transform(llama_7b_on_meta(), fxpeft.LoraConfig(r=16, target_modules="all-linear")),
        "peft.get_peft_model": lambda: peft.get_peft_model(llama_7b_on_meta(),
                                                           peft.LoraConfig(r=16, target_modules="all-linear")),
    }
    build = statistics.median(_seconds(llama_7b_on_meta) for _ in range(args.repeats))
    samples = {name: [] for name in contenders}
    for name, fn in contenders.items():  # warm-up: the first torch.export in a process pays one-time costs
        fn()
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            samples[name].append(_seconds(fn) - build)
    for name, values in samples.items():
        print(f"{name:<22}{statistics.median(values):>7.2f} s (building the meta model, {build:.2f} s, excluded)")


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
