"""FSDP2 for fxpeft results: ``shard(gm)`` applies ``fully_shard`` to each of the model's blocks,
then to the root.

FSDP2 all-gathers a group's parameters in a forward pre-hook of the module it wraps, so a group
works only if its module is *called*. In a result, the blocks (``model.layers.0`` …) are called
by the top graph and the root by the user; everything else (a projection, an adapter container)
is read by a graph through ``get_attr`` and never called. So the groups are: one per block (its
base weights and its adapters together) and the root (the rest). A result without blocks (no
repeated blocks in the model, or prefix tuning, which keeps the graph flat) can only be sharded as
one root group.

Dtypes: export baked the parameters' dtypes into the graphs (a LoRA site casts its input to the
adapter's dtype and the delta back to the base's). FSDP2's ``param_dtype`` would all-gather every
parameter of a group in that dtype, so a bf16 policy over fp32 adapters next to a bf16 base feeds
an fp32 activation to a bf16 adapter weight. ``shard`` therefore computes with the dtypes the
parameters are stored in: with a base stored in ``param_dtype`` the policy's param cast is dropped
(the adapters stay fp32, as PEFT keeps them); a base stored in another dtype is refused (cast the
model before ``transform``). FSDP2 wants one dtype among a group's *trainable* parameters only, so
a frozen bf16 base and fp32 adapters share a group.

Everything must be captured before sharding: a call signature seen for the first time afterwards
would be exported from sharded parameters, which fails. Call the result once with the keywords
training uses (``labels`` …) and once with those evaluation uses.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from .blocks import running_blocks


def shard(gm: nn.Module, **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` each block of ``gm``, then ``gm`` itself; keywords go to every call
    (``mesh``, ``reshard_after_forward``, ``mp_policy`` …). Returns ``gm`` (now an ``FSDPModule``)."""
    from torch.distributed.fsdp import fully_shard

    blocks = called_blocks(gm)
    policy = fully_shard_kwargs.get("mp_policy")
    if policy is not None:
        fully_shard_kwargs["mp_policy"] = stored_dtype_policy(gm, policy)
    for path, block in blocks.items():  # every check before the first fully_shard: no half-sharded module
        _check_trainable_dtypes(block, path)
    _check_trainable_dtypes(gm, "the root", skip=tuple(blocks.values()))
    for block in blocks.values():
        fully_shard(block, **fully_shard_kwargs)
    fully_shard(gm, **fully_shard_kwargs)
    return gm


def called_blocks(gm: nn.Module) -> dict[str, nn.Module]:
    """The blocks every captured graph calls (paths to modules); a clear error when there are none."""
    if getattr(gm, "_fxpeft_signatures", None) is None:
        raise TypeError(f"fxpeft.shard takes the result of fxpeft.transform, got {type(gm).__name__}.")
    blocks = running_blocks(gm)
    if not blocks:
        raise ValueError(
            f"fxpeft.shard shards each of the model's repeated blocks, and this result has none: {_why_flat(gm)}. "
            "FSDP2 all-gathers a module's parameters only when that module is called, and here the graph reads "
            "every parameter from the root, so per-module fully_shard calls leave parameters sharded ('got mixed "
            "torch.Tensor and DTensor'). Shard the root alone as one group, "
            "torch.distributed.fsdp.fully_shard(gm) (every parameter is all-gathered at once: only gradients and "
            "optimizer state stay sharded), or use DistributedDataParallel.")
    return blocks


def _why_flat(gm) -> str:
    from .state import method_of

    whole = [name for name in gm.peft_config if method_of(gm, name).whole_graph]
    if whole:
        return (f"adapter {whole[0]!r} ({type(gm.peft_config[whole[0]]).__name__}) rewrites the whole graph, so the "
                "result keeps one flat graph")
    if not gm._fxpeft_block_paths:
        return (f"fxpeft found no repeated blocks in {getattr(gm._fxpeft_source, '__class__', type(gm)).__name__} "
                "(blocks are the children of an nn.ModuleList, at least two, all of one class)")
    return ("the model's blocks could not be cut out of its graph as separate regions (something outside a block "
            "both reads from it and feeds it), so the graph stays flat")


def stored_dtype_policy(gm: nn.Module, policy):
    """``policy`` without its parameter cast when the frozen base is stored in ``param_dtype``
    (see the module docstring); a clear error when it is not."""
    if policy.param_dtype is None:
        return policy
    frozen = {p.dtype for p in gm.parameters() if not p.requires_grad and p.is_floating_point()}
    if frozen and frozen != {policy.param_dtype}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in frozen))
        raise ValueError(
            f"MixedPrecisionPolicy(param_dtype={policy.param_dtype}) would all-gather a base stored in {names} as "
            f"{policy.param_dtype}, but fxpeft's graphs were captured with the dtypes the parameters are stored in. "
            f"Store the base in that dtype before transforming: model.to({policy.param_dtype}) and then "
            "fxpeft.transform (adapters stay float32, as PEFT keeps them), or pass param_dtype=None.")
    return dataclasses.replace(policy, param_dtype=None)


def _check_trainable_dtypes(module: nn.Module, where: str, skip: tuple = ()) -> None:
    """FSDP2 reduces a group's gradients in one dtype: its trainable parameters need one dtype."""
    inner = {id(p) for block in skip for p in block.parameters()}
    found: dict[torch.dtype, str] = {}
    for name, param in module.named_parameters():
        if param.requires_grad and id(param) not in inner:
            found.setdefault(param.dtype, name)
    if len(found) > 1:
        examples = ", ".join(f"{name} ({str(dtype).removeprefix('torch.')})" for dtype, name in found.items())
        raise ValueError(
            f"FSDP2 needs one dtype among the trainable parameters it shards together, and {where} holds several: "
            f"{examples}. Keep trainable parameters in one dtype (e.g. transform a model stored in one dtype, or "
            "freeze the odd ones out).")


def full_adapter_state_dict(gm: nn.Module, rank0_only: bool = True) -> Optional[dict[str, torch.Tensor]]:
    """Every adapter's tensors of a sharded ``gm``, gathered to full CPU tensors under the module's
    own names: what ``gm.save_pretrained(dir, state_dict=...)`` reads. Every rank must call it (it
    all-gathers); with ``rank0_only`` the other ranks get None. Cheaper than
    ``get_model_state_dict(..., full_state_dict=True)``, which gathers the frozen base too."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from .checkpoint import adapter_key_map

    state = gm.state_dict(keep_vars=True)
    names = sorted({name for adapter in gm.peft_config for name in adapter_key_map(gm, adapter, state).values()})
    full = {}
    for name in names:  # the same order on every rank: each gather is a collective
        tensor = state[name]
        full[name] = (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
    if rank0_only and dist.is_initialized() and dist.get_rank() != 0:
        return None
    return full
