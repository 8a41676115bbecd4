"""Many adapters: mixed-adapter batches and adapter switching, fxpeft vs PEFT in one process.

Llama-shaped model (hidden 512, 4 layers), 8 LoRA adapters (r=16, all seven projections).
- mixed batch of 32 sequences x S tokens (--seq, default "1,64": a decode step and a prompt),
  each sample naming its adapter, no_grad: fxpeft's torch.compile'd graph (adapter_names given
  as an index tensor) and its eager graph against PEFT's adapter_names, eager and compiled;
  plus fxpeft's compiled graph on the same batch with one adapter for everyone;
- switching: set_adapter to each adapter not used before, then the next call of a torch.compile'd
  model (PEFT recompiles; PEFT's hotswap_adapter is shown too);
- adapters loaded (--loaded 1,8,30): the same calls with one adapter active and 1, 8 or 30
  adapters loaded (eager 1x1 and 4x64 tokens, compiled 1x1, a mixed batch of 8 x 1 tokens eager and
  compiled whose samples use the same two slots whatever is loaded: task0 and "__base__"), as ratios to one
  loaded; PEFT eager 1x1 alongside.
Run: python benchmarks/bench_adapters.py [--repeats N] [--seq 1,64] [--device cuda] [--skip-switch]
     [--loaded 1,8,30] [--only-loaded]
"""
from __future__ import annotations

import argparse
import copy
import tempfile

import torch

import fxpeft
from bench_lora import TARGETS, interleaved, llama_512, timed

N_ADAPTERS = 8


def build(base, n_adapters=N_ADAPTERS):
    import peft

    names = [f"task{i}" for i in range(n_adapters)]
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


def mixed_batch(names, reference, gm, repeats, seq, device):
    batch = {"input_ids": torch.randint(0, 8000, (32, seq), device=device),
             "attention_mask": torch.ones(32, seq, dtype=torch.long, device=device)}
    per_sample = [names[i % len(names)] for i in range(32)]
    index = fxpeft.adapter_indices(gm, per_sample, device=device)
    torch._dynamo.reset()
    ours, theirs = torch.compile(gm, fullgraph=True), torch.compile(reference)
    with torch.no_grad():
        expected = reference(**batch, adapter_names=per_sample).logits
        for got in (gm(**batch, adapter_names=per_sample), ours(**batch, adapter_names=index)):
            torch.testing.assert_close(got.logits, expected, rtol=1e-4, atol=1e-4)
        fxpeft.set_adapter(gm, names[0])
        return interleaved({
            "fxpeft compiled mixed": lambda: ours(**batch, adapter_names=index),
            "fxpeft compiled single": lambda: ours(**batch),
            "fxpeft eager mixed": lambda: gm(**batch, adapter_names=per_sample),
            "peft mixed": lambda: reference(**batch, adapter_names=per_sample),
            "peft compiled mixed": lambda: theirs(**batch, adapter_names=per_sample),
        }, repeats)


def switching(names, reference, gm, repeats, device):
    from peft.utils.hotswap import hotswap_adapter

    inputs = {"input_ids": torch.randint(0, 8000, (1, 32), device=device),
              "attention_mask": torch.ones(1, 32, dtype=torch.long, device=device)}
    torch._dynamo.reset()
    ours = torch.compile(gm, fullgraph=True)
    theirs = torch.compile(reference)
    saved = tempfile.mkdtemp()
    reference.save_pretrained(saved, selected_adapters=[names[1]])
    with torch.no_grad():
        ours(**inputs)
        theirs(**inputs)
        samples = {"fxpeft set_adapter": [], "peft set_adapter": [], "peft hotswap": []}
        # every switch goes to an adapter not used before: that is what costs PEFT a recompile
        # (dynamo caches one graph per active adapter, up to its recompile_limit of 8)
        for name in names[1:]:
            samples["fxpeft set_adapter"].append(timed(lambda: (fxpeft.set_adapter(gm, name), ours(**inputs))))
            samples["peft set_adapter"].append(timed(lambda: (reference.set_adapter(name), theirs(**inputs))))
        reference.set_adapter(names[0])
        theirs(**inputs)
        for _ in range(repeats):
            samples["peft hotswap"].append(timed(lambda: (
                hotswap_adapter(reference, f"{saved}/{names[1]}", adapter_name=names[0]), theirs(**inputs))))
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def adapters_loaded(base, counts, repeats, device):
    """Per-call cost with one adapter active and ``counts`` adapters loaded: {measure: {count: s}}."""
    one = {"input_ids": torch.randint(0, 8000, (1, 1), device=device),
           "attention_mask": torch.ones(1, 1, dtype=torch.long, device=device)}
    prompt = {"input_ids": torch.randint(0, 8000, (4, 64), device=device),
              "attention_mask": torch.ones(4, 64, dtype=torch.long, device=device)}
    mixed = {"input_ids": torch.randint(0, 8000, (8, 1), device=device),
             "attention_mask": torch.ones(8, 1, dtype=torch.long, device=device)}
    per_sample = ["task0", "__base__"] * 4
    torch._dynamo.reset()
    contenders = {}
    for count in counts:
        names, reference, gm = build(copy.deepcopy(base), count)
        reference, gm = reference.to(device), gm.to(device)
        fxpeft.set_adapter(gm, names[0])
        compiled = torch.compile(gm, fullgraph=True)
        with torch.no_grad():
            expected = reference(**one).logits
            torch.testing.assert_close(gm(**one).logits, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(compiled(**one).logits, expected, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gm(**mixed, adapter_names=per_sample).logits,
                                       reference(**mixed, adapter_names=per_sample).logits, rtol=1e-4, atol=1e-4)
            index = fxpeft.adapter_indices(gm, per_sample, device=device)
            torch.testing.assert_close(compiled(**mixed, adapter_names=index).logits,
                                       reference(**mixed, adapter_names=per_sample).logits, rtol=1e-4, atol=1e-4)
        contenders.update({
            ("fxpeft eager 1x1", count): lambda gm=gm: gm(**one),
            ("fxpeft compiled 1x1", count): lambda c=compiled: c(**one),
            ("fxpeft eager 4x64", count): lambda gm=gm: gm(**prompt),
            ("fxpeft eager mixed 8x1", count): lambda gm=gm: gm(**mixed, adapter_names=per_sample),
            ("fxpeft compiled mixed 8x1", count): lambda c=compiled, i=index: c(**mixed, adapter_names=i),
            ("peft eager 1x1", count): lambda r=reference: r(**one),
        })
    with torch.no_grad():
        times = interleaved(contenders, repeats)
    table = {}
    for (measure, count), value in times.items():
        table.setdefault(measure, {})[count] = value
    return table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-switch", action="store_true")
    parser.add_argument("--seq", default="1,64", help="comma-separated sequence lengths of the mixed batch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loaded", default="1,8,30", help="adapter counts for the adapters-loaded rows ('' skips)")
    parser.add_argument("--only-loaded", action="store_true", help="only the adapters-loaded rows")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.loaded:
        counts = [int(c) for c in args.loaded.split(",")]
        table = adapters_loaded(llama_512().eval(), counts, args.repeats, args.device)
        print(f"one adapter active, N loaded ({args.device}), median ms (ratio to {counts[0]} loaded):")
        print(f"  {'measure':<24}" + "".join(f"{f'N={c}':>18}" for c in counts))
        for measure, row in table.items():
            cells = "".join(f"{row[c] * 1e3:>10.2f} ({row[c] / row[counts[0]]:.2f}x)" for c in counts)
            print(f"  {measure:<24}{cells}")
    if args.only_loaded:
        return
    names, reference, gm = build(llama_512().eval())
    reference, gm = reference.to(args.device), gm.to(args.device)
    for seq in map(int, args.seq.split(",")):
        times = mixed_batch(names, reference, gm, args.repeats, seq, args.device)
        print(f"mixed batch (32 x {seq} tokens, {N_ADAPTERS} adapters, {args.device}), median seconds:")
        for key, value in times.items():
            print(f"  {key:<24}{value:.4f}")
        ours = times["fxpeft compiled mixed"]
        print(f"  throughput fxpeft compiled / PEFT eager     : {times['peft mixed'] / ours:.2f}x")
        print(f"  throughput fxpeft compiled / PEFT compiled  : {times['peft compiled mixed'] / ours:.2f}x")
        print(f"  throughput fxpeft eager / PEFT eager        : {times['peft mixed'] / times['fxpeft eager mixed']:.2f}x")
        print(f"  fxpeft compiled mixed / single adapter      : {ours / times['fxpeft compiled single']:.2f}x")
    if not args.skip_switch:
        switch = switching(names, reference, gm, args.repeats, args.device)
        print("switch adapter + next compiled call (batch 1 x 32), median seconds:")
        for key, value in switch.items():
            print(f"  {key:<20}{value:.4f}")


if __name__ == "__main__":
    main()
