"""Distributed training: two processes on CPU (gloo) train under DDP and FSDP2 as one process does
on the global batch (tests/distributed_worker.py, launched by torchrun); ``fxpeft.shard``'s errors
for what FSDP2 cannot shard per block."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch.distributed.fsdp import MixedPrecisionPolicy

import fxpeft
import models

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_as_one(tmp_path):
    out = tmp_path / "report.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), os.path.join(HERE, "distributed_worker.py"), str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    for run in ("ddp", "fsdp_by_hand", "fsdp_shard", "fsdp_bf16"):
        assert report[run]["diff"] < 1e-5, (run, report[run])
    assert report["fsdp_bf16"]["adapter_dtypes"] == ["torch.float32"]
    assert report["saved"] == ["adapter_config.json", "adapter_model.safetensors"]
    assert report["loaded"]["fxpeft"] < 1e-5 and report["loaded"]["peft"] < 1e-5


def test_shard_without_blocks_says_why():
    mlp = fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"(?s)no repeated blocks in MLP.*fully_shard\(gm\)"):
        fxpeft.shard(mlp)
    prefix = fxpeft.transform(models.TinyDecoder(), fxpeft.PrefixTuningConfig(num_virtual_tokens=2),
                              example_inputs=(torch.randint(0, models.VOCAB, (2, 5)),))
    with pytest.raises(ValueError, match=r"(?s)PrefixTuningConfig\) rewrites the whole graph.*DistributedDataParallel"):
        fxpeft.shard(prefix)


def test_shard_refuses_a_param_dtype_the_graphs_were_not_captured_in():
    gm = fxpeft.transform(models.TinyDecoder(), fxpeft.LoraConfig(r=2, target_modules=["qkv"]))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    with pytest.raises(ValueError, match=r"stored in float32 .*model\.to\(torch\.bfloat16\)"):
        fxpeft.shard(gm, mp_policy=policy)


def test_shard_refuses_trainable_parameters_of_two_dtypes_in_one_block():
    gm = fxpeft.transform(models.TinyDecoder().to(torch.bfloat16),
                          fxpeft.LoraConfig(r=2, target_modules=["qkv"], modules_to_save=["norm1"]))
    trainable = {p.dtype for p in gm.blocks[0].parameters() if p.requires_grad}
    assert trainable == {torch.bfloat16, torch.float32}  # the saved copy keeps the base dtype, LoRA is float32
    with pytest.raises(ValueError, match=r"blocks\.0 holds several: .*\(bfloat16\).*\(float32\)"):
        fxpeft.shard(gm)
    assert not any(type(m).__name__.startswith("FSDP") for m in gm.modules()), "shard refused after sharding part"
