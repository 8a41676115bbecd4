"""fxpeft vs PEFT, side by side in one process, on a Llama-shaped CPU model.

hidden 512, 4 layers, LoRA r=16 on all seven projections, batch 4 x 128 tokens.
Contenders are interleaved and medians reported as ratios fxpeft / PEFT (absolute times on
shared machines are noise). Run: python benchmarks/bench_lora.py [--repeats N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import fxpeft

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_512():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256)
    return LlamaForCausalLM(config)


def timed(fn) -> float:
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def interleaved(contenders: dict, repeats: int) -> dict[str, float]:
    samples = {name: [] for name in contenders}
    for fn in contenders.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            samples[name].append(timed(fn))
    return {name: statistics.median(values) for name, values in samples.items()}


def train_step(model, inputs):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def step():
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def main():
    import peft

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = llama_512().eval()
    inputs = {"input_ids": torch.randint(0, 8000, (4, 128)), "attention_mask": torch.ones(4, 128, dtype=torch.long)}

    peft_base = copy.deepcopy(base)
    transform_times = interleaved({
        "fxpeft": lambda: fxpeft.transform(base, fxpeft.LoraConfig(r=16, target_modules=TARGETS)),
        "peft": lambda: peft.get_peft_model(copy.deepcopy(peft_base), peft.LoraConfig(r=16, target_modules=TARGETS)),
    }, repeats=3)
    gm = fxpeft.transform(base, fxpeft.LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False))
    reference = peft.get_peft_model(peft_base, peft.LoraConfig(r=16, target_modules=TARGETS, init_lora_weights=False))
    gm(**inputs, labels=inputs["input_ids"])  # capture the labels signature before timing

    with torch.no_grad():
        inference = interleaved({
            "fxpeft": lambda: gm(**inputs),
            "peft": lambda: reference(**inputs),
            "base": lambda: base(**inputs),
        }, args.repeats)
    gm.train()
    reference.train()
    training = interleaved({"fxpeft": train_step(gm, inputs), "peft": train_step(reference, inputs)}, args.repeats)

    print(f"{'measure':<28}{'fxpeft':>10}{'peft':>10}{'ratio':>8}")
    rows = [("transform (s)", transform_times), ("unmerged inference (s)", inference), ("train step (s)", training)]
    for label, times in rows:
        print(f"{label:<28}{times['fxpeft']:>10.4f}{times['peft']:>10.4f}{times['fxpeft'] / times['peft']:>8.3f}")
    print(f"{'inference vs base model':<28}{inference['fxpeft'] / inference['base']:>28.3f}")


if __name__ == "__main__":
    main()
