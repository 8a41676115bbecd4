"""Generation: fxpeft vs PEFT ``generate`` side by side in one process, per-token decode time.

Llama-shaped model (hidden 512, 4 layers, vocab 8000), LoRA r=16 on all seven projections (``--method``:
DoRA, VeRA, LoHa, IA3, OFT (blocks of 32), BOFT (blocks of 32), HRA (r=16), RoAd or Lily instead, or LoRA plus
100 trainable token rows), random adapters made by PEFT and loaded into fxpeft from PEFT's files
(greedy tokens checked equal before timing). For each
batch size and context length (prompt tokens), greedy ``generate`` of ``--new`` tokens; a streamer
stamps each new token and the per-token time is the median gap between consecutive tokens (decode
steps only; the prompt's prefill is left out), median again over interleaved repeats.
Contenders:
- fxpeft eager: transformers' decoding over fxpeft's graph with a static KV cache (its default), sized
  per call for the prompt and the new tokens, as a user's call gets it;
- PEFT eager: PEFT's ``generate`` with transformers' default (dynamic) cache;
- with ``--compile``: both with ``compile_config=CompileConfig(fullgraph=True)`` (inductor; PEFT on the
  static cache, which compiled decoding needs; compiling the decode step is counted out: warm-up).
Compiled, the static cache is sized once for the longest context (``max_cache_len``), so both contexts
reuse one compiled graph. On the CPU fxpeft's steps (eager and compiled) attend over the filled positions
of the static cache only, as over a dynamic cache; PEFT compiled, and fxpeft elsewhere, over the whole.
With ``--tenants N``: N adapters loaded in both (LoRA, or ``--method road``: the methods PEFT's
``adapter_names`` takes here), a batch of ``--tenant-batch`` prompts (32 tokens) each
naming its adapter (``adapter_names``, round robin): fxpeft's mixed decode vs PEFT's, and fxpeft's
mixed decode vs the same batch with one adapter (with ``--compile`` also both compiled; PEFT's mixed
forward stays eager: it loops over adapters in Python).
Absolute times on shared machines are noise: read the ratios. Run:
python benchmarks/bench_generate.py [--batch 1,8] [--context 32,256] [--new 16] [--compile]
                                    [--method lora|dora|vera|loha|ia3|oft|boft|hra|road|lily|lora_tokens]
                                    [--tenants 8 --tenant-batch 32 [--method lora|road]] [--device cuda]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import tempfile
import time

import torch

import fxpeft
from bench_lora import TARGETS


# --method: PEFT's config of each method compared (LoRA's fields, ``config``, shared with the multi-tenant rows)
METHODS = {
    "lora": lambda peft, config: peft.LoraConfig(**config),
    "dora": lambda peft, config: peft.LoraConfig(**config, use_dora=True),
    "vera": lambda peft, config: peft.VeraConfig(r=16, target_modules=TARGETS, init_weights=False),
    "loha": lambda peft, config: peft.LoHaConfig(r=16, alpha=32, target_modules=TARGETS, init_weights=False),
    "ia3": lambda peft, config: peft.IA3Config(target_modules=TARGETS, feedforward_modules=["down_proj"],
                                               init_ia3_weights=False),
    "oft": lambda peft, config: peft.OFTConfig(r=0, oft_block_size=32, target_modules=TARGETS, init_weights=False),
    "boft": lambda peft, config: peft.BOFTConfig(boft_block_size=32, target_modules=TARGETS, init_weights=False),
    "hra": lambda peft, config: peft.HRAConfig(r=16, target_modules=TARGETS, init_weights=False),
    "road": lambda peft, config: peft.RoadConfig(variant="road_2", group_size=32, target_modules=TARGETS,
                                                 init_weights=False),
    "lily": lambda peft, config: peft.LilyConfig(r=16, target_modules=TARGETS, init_weights=False),
    # LoRA plus 100 trainable token rows of the embedding (PEFT's layer copies the embedding at every step)
    "lora_tokens": lambda peft, config: peft.LoraConfig(**config, trainable_token_indices=list(range(0, 8000, 80))),
}
MIXED = {"lora", "road"}  # the methods above whose mixed batches PEFT runs (adapter_names)


def llama_512():
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    return LlamaForCausalLM(config)


class Stamps:
    """A streamer that notes when each new token arrives (the first ``put`` is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        if value.is_cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self):
        pass

    def per_token(self) -> float:
        gaps = [b - a for a, b in zip(self.times[1:], self.times[2:])]  # between generated tokens
        return statistics.median(gaps)


def check_tokens(name: str, got: torch.Tensor, expected: torch.Tensor, device: str) -> None:
    """Equal tokens on CPU (asserted); elsewhere kernels round differently, so report where greedy paths part."""
    if torch.equal(got, expected):
        return
    assert device != "cpu", f"{name} generated other tokens than PEFT"
    step = int((got != expected).any(0).nonzero()[0])
    print(f"note: {name}'s tokens part from PEFT's at position {step} of {got.shape[-1]} "
          f"({device} kernels round differently; the timings still cover the same number of tokens)")


def per_token_times(contenders: dict, inputs: dict, repeats: int) -> tuple[dict, dict]:
    """Each contender's tokens (a warm-up run) and median per-token time over interleaved repeats. A
    contender whose warm-up fails (PEFT's DoRA does not compile with fullgraph=True) is reported and
    left out of ``contenders``."""
    tokens = {}
    for name, (model, kw) in list(contenders.items()):
        try:
            with torch.no_grad():
                tokens[name] = model.generate(**inputs, **kw)
        except Exception as error:  # noqa: BLE001 (any failure: said, and the others still measured)
            print(f"note: {name} failed: {type(error).__name__}: {str(error).splitlines()[0]}")
            del contenders[name]
    samples = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, (model, kw) in contenders.items():
            stamps = Stamps()
            with torch.no_grad():
                model.generate(**inputs, **kw, streamer=stamps)
            samples[name].append(stamps.per_token())
    return tokens, {name: statistics.median(values) for name, values in samples.items()}


def main():
    import peft
    from transformers import CompileConfig

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", default="1,8")
    parser.add_argument("--context", default="32,256")
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tenants", type=int, default=0)
    parser.add_argument("--tenant-batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--method", default="lora", choices=sorted(METHODS),
                        help="the adapter's method (the multi-tenant rows: lora or road)")
    args = parser.parse_args()
    if args.tenants and args.method not in MIXED:
        parser.error(f"--tenants compares mixed batches (PEFT's adapter_names), which PEFT runs for {sorted(MIXED)} "
                     "of these methods")
    torch.manual_seed(0)
    batches = [int(b) for b in args.batch.split(",") if b]  # --batch "": the multi-tenant rows only
    contexts = [int(c) for c in args.context.split(",")]
    base = llama_512().to(args.device).eval()
    config = dict(r=16, lora_alpha=32, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)
    reference = peft.get_peft_model(copy.deepcopy(base), METHODS[args.method](peft, config)).eval()
    with tempfile.TemporaryDirectory() as directory:  # PEFT's adapter, as a user moves one: through its files
        reference.save_pretrained(directory)
        gm = fxpeft.from_pretrained(base, directory).eval()
    cache_len = max(contexts) + args.new + 8
    common = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)
    static = dict(common, cache_implementation="static", max_cache_len=cache_len)
    compiled = CompileConfig(fullgraph=True)
    compiled._compile_all_devices = True  # transformers compiles on accelerators only unless told (fxpeft sets it itself)
    contenders = {"fxpeft eager": (gm, common), "PEFT eager": (reference, common)}  # eager: a cache sized per call
    if args.compile:
        contenders["fxpeft compiled"] = (gm, dict(common, max_cache_len=cache_len, compile_config=compiled))
        contenders["PEFT compiled"] = (reference, dict(static, compile_config=compiled))

    print(f"Llama hidden 512 x 4 layers, {args.method} (r=16 where it has a rank) on all seven projections, "
          f"{args.new} new tokens, device {args.device}, {torch.get_num_threads()} threads")
    for batch in batches:
        results = {}
        for context in contexts:
            ids = torch.randint(1, 8000, (batch, context), device=args.device)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            tokens, times = per_token_times(contenders, inputs, args.repeats)
            for name, got in tokens.items():
                check_tokens(name, got, tokens["PEFT eager"], args.device)
            results.update({(name, context): value for name, value in times.items()})
        print(f"\nbatch {batch}: per-token decode time, ms (and fxpeft's speed-up over PEFT eager)")
        print(f"{'contender':<18}" + "".join(f"{f'context {c}':>22}" for c in contexts)
              + (f"{f'{contexts[-1]} / {contexts[0]}':>12}" if len(contexts) > 1 else ""))
        for name in contenders:
            if any((name, context) not in results for context in contexts):
                continue
            row = f"{name:<18}"
            for context in contexts:
                ms = 1e3 * results[name, context]
                row += f"{ms:>12.2f} ({results['PEFT eager', context] / results[name, context]:5.2f}x)  "
            if len(contexts) > 1:
                row += f"{results[name, contexts[-1]] / results[name, contexts[0]]:>10.2f}x"
            print(row)
    if args.tenants:
        tenants(gm, reference, config, args, common, compiled if args.compile else None)


def tenants(gm, reference, config, args, common, compile_config=None):
    import peft

    names = ["default"] + [f"t{i}" for i in range(1, args.tenants)]
    for name in names[1:]:  # random adapters (init_weights=False), moved to fxpeft through PEFT's files
        reference.add_adapter(name, METHODS[args.method](peft, config))
    with tempfile.TemporaryDirectory() as directory:
        reference.save_pretrained(directory, selected_adapters=names[1:])
        for name in names[1:]:
            gm.load_adapter(os.path.join(directory, name), name)
    ids = torch.randint(1, 8000, (args.tenant_batch, 32), device=args.device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    per_row = [names[i % len(names)] for i in range(args.tenant_batch)]
    contenders = {"fxpeft mixed": (gm, dict(common, adapter_names=per_row)),  # one prompt length: one cache size
                  "PEFT mixed": (reference, dict(common, adapter_names=per_row)),
                  "fxpeft one adapter": (gm, common)}
    if compile_config is not None:  # PEFT's mixed forward loops over adapters in Python: eager only
        contenders.update({f"{name} compiled": (model, dict(kw, compile_config=compile_config))
                           for name, (model, kw) in list(contenders.items()) if name.startswith("fxpeft")})
    tokens, times = per_token_times(contenders, inputs, args.repeats)
    for name in contenders:
        if name.startswith("fxpeft mixed"):
            check_tokens(name, tokens[name], tokens["PEFT mixed"], args.device)
    print(f"\n{args.tenants} adapters, {args.tenant_batch} sequences each naming its adapter: per-token decode time, ms")
    for name, value in times.items():
        print(f"{name:<20}{1e3 * value:>10.2f}")
    for suffix in ("", " compiled") if compile_config is not None else ("",):
        mixed, one = times["fxpeft mixed" + suffix], times["fxpeft one adapter" + suffix]
        print(f"fxpeft mixed{suffix} speed-up over PEFT mixed: {times['PEFT mixed'] / mixed:.2f}x; "
              f"fxpeft mixed / one adapter{suffix}: {mixed / one:.2f}x")


if __name__ == "__main__":
    main()
