"""Train a LoRA adapter on several processes: DDP or FSDP2, CPU (gloo) or GPU (nccl).

    torchrun --nproc_per_node 2 examples/train_distributed.py            # FSDP2: fxpeft.shard
    torchrun --nproc_per_node 2 examples/train_distributed.py --ddp      # DistributedDataParallel
    torchrun --nproc_per_node 2 examples/train_distributed.py --bf16     # FSDP2, bf16 base, fp32 adapters
    python examples/train_distributed.py                                 # one process, same code

Every process builds the same small Llama (a config, no download), transforms it, and trains on its
share of each global batch. Under FSDP2 each of the model's blocks (``model.layers.0`` …) is one
sharded group and the root another; rank 0 saves the gathered adapter in PEFT's format, which
loads anywhere (here: ``fxpeft.from_pretrained`` in the same script, unsharded).
"""
import argparse
import os
import socket
import tempfile

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy
from torch.nn.parallel import DistributedDataParallel
from transformers import LlamaConfig, LlamaForCausalLM

import fxpeft

VOCAB, GLOBAL_BATCH, SEQ, STEPS = 128, 8, 16, 20


def init_distributed() -> None:
    """torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT; a plain ``python`` run is a group of one."""
    if "RANK" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def base_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # the same weights on every rank
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).to(dtype)


def global_batch(step: int) -> torch.Tensor:
    """Counting sequences (each token the previous + 1): something the adapter learns quickly."""
    g = torch.Generator().manual_seed(step)
    starts = torch.randint(0, VOCAB, (GLOBAL_BATCH, 1), generator=g)
    return (starts + torch.arange(SEQ)) % VOCAB


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ddp", action="store_true", help="DistributedDataParallel instead of FSDP2")
    parser.add_argument("--bf16", action="store_true", help="a bf16 base with fp32 adapters (FSDP2)")
    args = parser.parse_args()
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    # a bf16 base before transform: fxpeft's graphs compute in the dtypes they were captured in,
    # and the adapters it adds stay float32 (as PEFT keeps them)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    gm = fxpeft.transform(base_model(dtype).to(device),
                          fxpeft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    if rank == 0:
        gm.print_trainable_parameters()
    # capture every call signature before sharding (here: training with labels, evaluation without)
    sample = global_batch(0)[:2].to(device)
    gm(input_ids=sample, labels=sample)
    gm(input_ids=sample)

    if args.ddp:
        model = DistributedDataParallel(gm)
    else:
        # fully_shard per block, then the root; by hand: for layer in gm.model.layers: fully_shard(layer),
        # then fully_shard(gm)
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        model = fxpeft.shard(gm, mp_policy=policy)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    for step in range(STEPS):
        batch = global_batch(step).chunk(world)[rank].to(device)  # this rank's share
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 5 == 0 or step == STEPS - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:2d}  loss {mean.item() / world:.4f}")

    # every rank gathers (a collective); rank 0 writes PEFT's adapter_config.json + adapter_model.safetensors
    adapters = fxpeft.full_adapter_state_dict(gm)
    if rank == 0:
        directory = tempfile.mkdtemp(prefix="fxpeft-distributed-")
        gm.save_pretrained(directory, state_dict=adapters)
        loaded = fxpeft.from_pretrained(base_model(dtype), directory)  # a plain, unsharded module
        check = global_batch(STEPS)[:2]
        with torch.no_grad():
            print(f"saved to {directory}; loaded adapter loss {loaded(input_ids=check, labels=check).loss.item():.4f}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
