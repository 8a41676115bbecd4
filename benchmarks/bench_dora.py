"""DoRA vs LoRA, fxpeft vs PEFT, side by side in one process, on bench_lora's Llama-shaped model.

hidden 512, 4 layers, r=16 on all seven projections, batch 4 x 128 tokens, lora_dropout=0.
- eval forward (no_grad): fxpeft DoRA (its weight norm cached until a weight changes), fxpeft
  LoRA, PEFT DoRA recomputing the norm every call (its default), PEFT DoRA under
  ``peft.helpers.DoraCaching`` (a separate copy, so that the uncached contender's calls do not
  clear its cache), PEFT LoRA;
- train step (forward + backward + AdamW step): fxpeft DoRA, PEFT DoRA, fxpeft LoRA.
Before timing, fxpeft DoRA is given PEFT DoRA's adapter tensors (random B and magnitude) and the
logits are checked equal. Contenders are interleaved and medians reported; absolute times on
shared machines are noise, read the ratios. Run:
python benchmarks/bench_dora.py [--repeats N] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy

import torch

import fxpeft
from bench_lora import TARGETS, interleaved, llama_512, train_step

TOLERANCE = 1e-4


def build(base):
    """fxpeft and PEFT DoRA and LoRA models over copies of ``base``, each fxpeft model holding the
    adapter tensors of its PEFT counterpart; DoRA magnitudes are perturbed so that m / n != 1."""
    import peft

    config = dict(r=16, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    models = {}
    for name, use_dora in (("dora", True), ("lora", False)):
        reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config, use_dora=use_dora))
        gm = fxpeft.transform(base, fxpeft.LoraConfig(**config, use_dora=use_dora))
        ours = dict(gm.named_parameters())
        with torch.no_grad():
            for key, value in reference.named_parameters():
                if value.requires_grad:
                    if "lora_magnitude_vector" in key:
                        value.mul_(1 + 0.1 * torch.randn_like(value))
                    ours[key.removeprefix("base_model.model.")].copy_(value)
        models[name] = (gm.eval(), reference.eval())
    return models


def max_logit_diff(a, b, inputs) -> float:
    with torch.no_grad():
        return (a(**inputs).logits - b(**inputs).logits).abs().max().item()


def main():
    from peft.helpers import DoraCaching

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    base = llama_512().to(args.device).eval()
    inputs = {"input_ids": torch.randint(0, 8000, (4, 128), device=args.device),
              "attention_mask": torch.ones(4, 128, dtype=torch.long, device=args.device)}
    models = build(base)
    (dora, peft_dora), (lora, peft_lora) = models["dora"], models["lora"]
    peft_dora_cached = copy.deepcopy(peft_dora)

    def cached():
        with DoraCaching():
            return peft_dora_cached(**inputs)

    diff = max_logit_diff(dora, peft_dora, inputs)
    with DoraCaching():
        diff_cached = max_logit_diff(dora, peft_dora_cached, inputs)
    diff_lora = max_logit_diff(lora, peft_lora, inputs)
    print(f"max |logits diff| fxpeft vs PEFT: DoRA {diff:.2e}, DoRA cached {diff_cached:.2e}, LoRA {diff_lora:.2e}")
    assert max(diff, diff_cached, diff_lora) < TOLERANCE, "fxpeft and PEFT compute different things"
    for gm in (dora, lora):
        gm(**inputs, labels=inputs["input_ids"])  # capture the labels signature before timing

    with torch.no_grad():
        inference = interleaved({
            "fxpeft dora": lambda: dora(**inputs),
            "fxpeft lora": lambda: lora(**inputs),
            "peft dora": lambda: peft_dora(**inputs),
            "peft dora cached": cached,
            "peft lora": lambda: peft_lora(**inputs),
        }, args.repeats)
    for model in (dora, lora, peft_dora):
        model.train()
    training = interleaved({name: train_step(model, inputs) for name, model in
                            (("fxpeft dora", dora), ("peft dora", peft_dora), ("fxpeft lora", lora))}, args.repeats)

    print(f"\n{'median seconds':<22}{'eval forward':>14}{'train step':>12}")
    for name in inference:
        step = f"{training[name]:>12.4f}" if name in training else f"{'':>12}"
        print(f"{name:<22}{inference[name]:>14.4f}{step}")
    print(f"\n{'ratio':<52}{'value':>8}  target")
    ratios = [
        ("eval: fxpeft DoRA / fxpeft LoRA", inference["fxpeft dora"] / inference["fxpeft lora"], "<= 1.1"),
        ("eval: PEFT DoRA cached / PEFT LoRA", inference["peft dora cached"] / inference["peft lora"],
         "reference (~1.16)"),
        ("eval: PEFT DoRA / PEFT LoRA", inference["peft dora"] / inference["peft lora"], ""),
        ("eval: fxpeft DoRA / PEFT DoRA", inference["fxpeft dora"] / inference["peft dora"], ""),
        ("eval: fxpeft DoRA / PEFT DoRA cached", inference["fxpeft dora"] / inference["peft dora cached"], ""),
        ("train: fxpeft DoRA / PEFT DoRA", training["fxpeft dora"] / training["peft dora"], "<= 1.0"),
        ("train: fxpeft DoRA / fxpeft LoRA", training["fxpeft dora"] / training["fxpeft lora"], ""),
    ]
    for label, value, target in ratios:
        print(f"{label:<52}{value:>8.3f}  {target}")


if __name__ == "__main__":
    main()
