"""Run by tests/test_distributed.py as ``torchrun --nproc_per_node 2 distributed_worker.py OUT_JSON``
(gloo, CPU). Every rank trains the same tiny Llama's LoRA adapter on its half of each global batch
under DDP, FSDP2 applied by ``fxpeft.shard``, FSDP2 applied by hand (per block, then the root) and
FSDP2 with a bf16 base and fp32 adapters, and compares the adapter with a single-process run on the
whole global batch. Rank 0 then saves the FSDP2 adapter and loads it in fxpeft and in PEFT.

Each check raises AssertionError naming what differs; rank 0 writes the measured figures to
OUT_JSON, which the test reads (so a worker that skipped a check cannot pass).
"""
from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

import fxpeft  # noqa: E402
import models  # noqa: E402
from fxpeft.blocks import blocks_of  # noqa: E402
from fxpeft.distributed import full_adapter_state_dict  # noqa: E402

STEPS, ROWS, SEQ = 3, 4, 8
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
BATCHES = [torch.randint(1, models.VOCAB, (ROWS, SEQ), generator=torch.Generator().manual_seed(step))
           for step in range(STEPS)]
PROBE = torch.randint(1, models.VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(99))


def base_model(dtype=torch.float32):
    torch.manual_seed(0)
    return models.llama().to(dtype)


def template(dtype=torch.float32):
    """The transformed model every run starts from: B nonzero (so the adapter acts from the start),
    both call signatures captured before any sharding."""
    gm = fxpeft.transform(base_model(dtype), fxpeft.LoraConfig(**LORA))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in gm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)
    gm(input_ids=BATCHES[0], labels=BATCHES[0])
    gm(input_ids=PROBE)
    return gm


def train(model, params, local: bool) -> None:
    """AdamW on each global batch (or this rank's half of it)."""
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    for batch in BATCHES:
        if local:
            batch = batch.chunk(dist.get_world_size())[dist.get_rank()]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def adapter(gm) -> dict[str, torch.Tensor]:
    """The trainable tensors, full (an all-gather per sharded one: every rank calls this)."""
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().float().clone()
            for name, p in gm.named_parameters() if p.requires_grad}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys(), f"adapter names differ: {sorted(a.keys() ^ b.keys())[:6]}"
    return max((a[k] - b[k]).abs().max().item() for k in a)


def same_on_every_rank(state: dict, what: str) -> None:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    for rank, theirs in enumerate(gathered):
        diff = max_diff(theirs, gathered[0])
        assert diff == 0.0, f"{what}: rank {rank}'s adapter differs from rank 0's by {diff}"


def probe(gm) -> torch.Tensor:
    with torch.no_grad():
        return gm(input_ids=PROBE).logits.float()


def run_sharded(tpl, reference: dict, what: str, shard_fn, tolerance: float) -> tuple[object, dict]:
    gm = copy.deepcopy(tpl)
    before = probe(gm)
    with gm.disable_adapter():
        base_out = probe(gm)
    shard_fn(gm)
    for path, block in blocks_of(gm).items():  # the gates the block graphs read are still the root's tensor
        assert block._buffers["_fxpeft_gates"] is gm._buffers["_fxpeft_gates"], f"{what}: {path} lost the gates"
    sharded_out = probe(gm)
    assert (sharded_out - before).abs().max() < 1e-5, f"{what}: outputs changed by sharding"
    assert (sharded_out - base_out).abs().max() > 1e-3, f"{what}: the adapter no longer acts after sharding"
    with gm.disable_adapter():
        assert (probe(gm) - base_out).abs().max() < 1e-5, f"{what}: disabling the adapter does not act when sharded"
    train(gm, [p for p in gm.parameters() if p.requires_grad], local=True)
    state = adapter(gm)
    same_on_every_rank(state, what)
    diff = max_diff(state, reference)
    assert diff < tolerance, f"{what}: adapter differs from the single-process run by {diff}"
    return gm, {"diff": diff}


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = {"world_size": dist.get_world_size()}

    tpl = template()
    single = copy.deepcopy(tpl)
    train(single, [p for p in single.parameters() if p.requires_grad], local=False)
    reference = adapter(single)
    moved = max_diff(reference, adapter(tpl))
    assert moved > 1e-3, f"training did not change the adapter ({moved})"

    # (a) DDP
    ddp_gm = copy.deepcopy(tpl)
    ddp = DistributedDataParallel(ddp_gm)
    train(ddp, [p for p in ddp.parameters() if p.requires_grad], local=True)
    state = adapter(ddp_gm)
    same_on_every_rank(state, "DDP")
    report["ddp"] = {"diff": max_diff(state, reference)}
    assert report["ddp"]["diff"] < 1e-5, f"DDP: adapter differs from the single-process run by {report['ddp']}"

    # (b) FSDP2 by hand, as a user writes it: each block, then the root
    def by_hand(gm):
        for layer in gm.model.layers:
            fully_shard(layer)
        fully_shard(gm)

    _, report["fsdp_by_hand"] = run_sharded(tpl, reference, "FSDP2 by hand", by_hand, 1e-5)

    # (b') FSDP2 through fxpeft.shard, then save the gathered adapter from rank 0
    gm, report["fsdp_shard"] = run_sharded(tpl, reference, "fxpeft.shard", fxpeft.shard, 1e-5)
    trained_out = probe(gm)
    try:  # a keyword set first seen after sharding cannot be captured from sharded weights: say so
        gm(input_ids=PROBE, attention_mask=torch.ones_like(PROBE), token_type_ids=torch.zeros_like(PROBE))
        raise AssertionError("a new call signature after sharding did not raise")
    except RuntimeError as error:
        assert "call it once with these keywords before fully_shard" in str(error), error
    flat = fxpeft.transform(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)),
                            fxpeft.LoraConfig(target_modules=["0"]))
    fully_shard(flat.get_submodule("0"))  # a flat graph reads every parameter from the root: per-module sharding cannot work
    fully_shard(flat)
    try:
        flat(torch.randn(2, 8))
        raise AssertionError("per-module sharding of a flat result did not raise")
    except ValueError as error:
        assert "has none" in str(error) and "DistributedDataParallel" in str(error), error
    full = get_model_state_dict(gm, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    adapters_only = full_adapter_state_dict(gm)
    directory = tempfile.mkdtemp(prefix="fxpeft-fsdp-") if rank == 0 else None
    if rank == 0:
        for name, tensor in adapters_only.items():
            assert torch.equal(tensor, full[name]), f"full_adapter_state_dict differs from the full state at {name}"
        gm.save_pretrained(directory, state_dict=full)
        report["saved"] = sorted(os.listdir(directory))
        report["loaded"] = check_loads(directory, trained_out)

    # mixed precision: a bf16 base, fp32 adapters, fp32 gradient reduction
    tpl16 = template(torch.bfloat16)
    single16 = copy.deepcopy(tpl16)
    train(single16, [p for p in single16.parameters() if p.requires_grad], local=False)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    gm16, report["fsdp_bf16"] = run_sharded(tpl16, adapter(single16), "FSDP2 bf16", lambda m: fxpeft.shard(
        m, mp_policy=policy), 1e-5)
    dtypes = {str(p.dtype) for p in gm16.parameters() if p.requires_grad}
    assert dtypes == {"torch.float32"}, f"FSDP2 bf16: adapters are stored in {dtypes}, not float32"
    report["fsdp_bf16"]["adapter_dtypes"] = sorted(dtypes)

    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(report, handle, indent=2)
    dist.barrier()
    dist.destroy_process_group()


def check_loads(directory: str, expected: torch.Tensor) -> dict:
    """The saved adapter in a plain (unsharded) module: fxpeft's and PEFT's."""
    import peft

    loaded = fxpeft.from_pretrained(base_model(), directory)
    ours = (probe(loaded) - expected).abs().max().item()
    assert ours < 1e-5, f"fxpeft.from_pretrained of the FSDP2 checkpoint gives outputs {ours} away"
    theirs_model = peft.PeftModel.from_pretrained(base_model(), directory)
    with torch.no_grad():
        theirs = (theirs_model(input_ids=PROBE).logits - expected).abs().max().item()
    assert theirs < 1e-5, f"peft.PeftModel.from_pretrained of the FSDP2 checkpoint gives outputs {theirs} away"
    return {"fxpeft": ours, "peft": theirs}


if __name__ == "__main__":
    main(sys.argv[1])
