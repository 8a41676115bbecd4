"""One method of each form vs PEFT's same method, side by side in one process.

Llama-shaped model (hidden 512, 4 layers, vocab 8000), each method on all seven projections (IA3: its
default k/v/down targets; prompt and prefix tuning: 16 virtual tokens), batch ``--batch`` x ``--seq``
tokens. For each method: the eval forward (no_grad) and a training step (forward, backward, AdamW),
fxpeft's median over PEFT's median (contenders interleaved). Forms: additive (LoRA, LoHa, LoKr,
FourierFT, HiRA), scaling (IA3), weight map (OFT, BOFT, HRA), shared tensors (VeRA), sequence (prompt
and prefix tuning). Absolute times on shared machines are noise: read the ratios. Run:
python benchmarks/bench_methods.py [--repeats N] [--batch 4] [--seq 128] [--only oft,vera] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy

import torch

import fxpeft
from bench_lora import TARGETS, interleaved, llama_512, train_step

# name -> (form, config class name shared by both packages, options)
METHODS = {
    "lora": ("additive", "LoraConfig", dict(r=16, lora_alpha=32, target_modules=TARGETS)),
    "loha": ("additive", "LoHaConfig", dict(r=16, alpha=32, target_modules=TARGETS)),
    "lokr": ("additive", "LoKrConfig", dict(r=16, alpha=32, target_modules=TARGETS)),
    "fourierft": ("additive", "FourierFTConfig", dict(n_frequency=1000, target_modules=TARGETS)),
    "hira": ("additive", "HiraConfig", dict(r=16, target_modules=TARGETS)),
    "ia3": ("scaling", "IA3Config", dict(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])),
    "oft": ("weight map", "OFTConfig", dict(r=0, oft_block_size=32, target_modules=TARGETS)),
    "boft": ("weight map", "BOFTConfig", dict(boft_block_size=32, target_modules=TARGETS)),
    "hra": ("weight map", "HRAConfig", dict(r=16, target_modules=TARGETS)),
    "vera": ("shared tensors", "VeraConfig", dict(r=64, target_modules=TARGETS)),
    "prompt": ("sequence", "PromptTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=16)),
    "prefix": ("sequence", "PrefixTuningConfig", dict(task_type="CAUSAL_LM", num_virtual_tokens=16)),
}


def measure(name: str, base, inputs: dict, repeats: int) -> dict[str, float]:
    import peft

    _, config_name, options = METHODS[name]
    theirs = peft.get_peft_model(copy.deepcopy(base), getattr(peft, config_name)(**options))
    ours = fxpeft.transform(copy.deepcopy(base), getattr(fxpeft, config_name)(**options))
    ratios = {}
    for model in (theirs, ours):
        model.eval()

    def forward(model):
        def run():
            with torch.no_grad():
                model(**inputs)
        return run

    times = interleaved({"fxpeft": forward(ours), "PEFT": forward(theirs)}, repeats)
    ratios["eval"] = times["fxpeft"] / times["PEFT"]
    for model in (theirs, ours):
        model.train()
    times = interleaved({"fxpeft": train_step(ours, inputs), "PEFT": train_step(theirs, inputs)}, repeats)
    ratios["train"] = times["fxpeft"] / times["PEFT"]
    return ratios


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--only", default="", help="comma-separated method names (default: all)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(METHODS)
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    torch.manual_seed(0)
    base = llama_512().to(args.device)
    inputs = {"input_ids": torch.randint(0, 8000, (args.batch, args.seq), device=args.device),
              "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long, device=args.device)}
    print(f"Llama hidden 512 x 4 layers, batch {args.batch} x {args.seq}, {args.device}, "
          f"{torch.get_num_threads()} threads; fxpeft time / PEFT time (below 1: fxpeft faster)")
    print(f"{'method':<12}{'form':<16}{'eval forward':>14}{'train step':>12}")
    for name in names:
        ratios = measure(name, base, inputs, args.repeats)
        print(f"{name:<12}{METHODS[name][0]:<16}{ratios['eval']:>13.2f}x{ratios['train']:>11.2f}x", flush=True)


if __name__ == "__main__":
    main()
