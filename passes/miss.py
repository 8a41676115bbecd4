"""MiSS (PEFT's tuners/miss), on the weight-map form: a shard of the weight shared across its blocks.

``init_weights`` picks the variant (per adapter here; PEFT takes the first adapter's at a layer):

    True / False ("balance"):  ΔW[o, i] = D[i mod r, o],  D = miss_block (r, out)
                               Δ(x) = (Σ over the r-wide chunks of dropout(x), zero-padded) @ D
    "mini":                    as balance with D = miss_block (r, mini_r) repeated out/mini_r times
    "bat":                     W' = W + blocks(W) @ B + B, block by block: W cut into (r, r) blocks
                               W[bo, bi], B = miss_block (out/r, r, r), W'[bo, bi] = W[bo, bi](I + B[bo]) + B[bo]

on linear sites (nn.Linear and quantized linears; PEFT's MiSS takes no other layer). Balance and
mini add to the output (no weight needed); bat computes with a map of the weight, so the site
reads its float weight (a quantized layer's dequantized one, as PEFT's ``get_base_weight``) and
several active bat adapters chain (W → W + Δ(W) → …), as PEFT's forward. Merging adds ΔW (bat:
applies the map); unmerging subtracts it (bat: ``(W - B)(I + B)^-1``, PEFT's inverse).

State, PEFT's names: ``<path>.miss_block.<adapter>`` (the only trained tensor),
``<path>.miss_dropout.<adapter>`` (balance / mini input dropout) and the form's gate
``<path>.miss_gate.<adapter>`` (value 1, 0 once merged; not saved). Init as PEFT: zeros (every
variant: the identity start), or with ``init_weights=False`` a Kaiming-uniform balance block.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, float_weight, site_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict, weight_map
from fxpeft.kept import SiteParts
from fxpeft.registry import register_method
from fxpeft.rewrite import Lowering, samples_of
from fxpeft.targets import output_heads

aten = torch.ops.aten


@dataclass
class MissConfig(PeftConfigBase):
    """PEFT's MissConfig: ``r`` (64, the shard's rows, along the input features), ``miss_dropout``,
    ``mini_r`` (1, the "mini" block's columns), ``init_weights`` (True: balance, False: balance from
    a random block, "bat", "mini"), ``bias`` and the targeting fields."""

    r: int = 64
    miss_dropout: float = 0.0
    mini_r: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: Union[bool, Literal["bat", "mini"]] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None

    peft_type = "MISS"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        check_layer_fields(self, pattern=False)
        # what PEFT refuses only when it builds a layer, or never (a mistyped variant reads as balance there)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        if not isinstance(self.mini_r, int) or isinstance(self.mini_r, bool) or self.mini_r <= 0:
            raise ValueError(f"MissConfig.mini_r must be a positive integer, got {self.mini_r!r}.")
        if self.init_weights not in (True, False, "bat", "mini"):
            raise ValueError(f"MissConfig.init_weights must be True, False, 'bat' or 'mini' (the MiSS variant), "
                             f"got {self.init_weights!r}.")
        check_dropout(self, "miss_dropout")
        if self.bias not in ("none", "all") and not self.bias.endswith("_only"):
            raise ValueError(f"MissConfig.bias must be 'none', 'all' or 'MiSS_only', got {self.bias!r}.")


class MissGate(AdapterGate):
    """The form's gate plus the adapter's variant ("balance", "mini" or "bat")."""

    def __init__(self, variant: str, out_features: int, dropout: float):
        super().__init__(1.0, dropout)
        self.variant = variant
        self.out_features = out_features

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, variant={self.variant}"


def variant_of(config: MissConfig) -> str:
    return config.init_weights if config.init_weights in ("bat", "mini") else "balance"


def check_site(module: nn.Module, site: Site, weight, config: MissConfig) -> None:
    """PEFT's layer type and ``update_layer`` checks, PEFT's words, before any adapter is made."""
    if site.fan_in_fan_out:
        raise ValueError(f"Target module {site.path!r} ({type(module).__name__}) is not supported. Currently, only "
                         "`torch.nn.Linear` (optionally quantized) is supported (PEFT's MiSS). Leave it out of "
                         "target_modules.")
    out_f, in_f = weight.shape
    if config.r > in_f:
        raise ValueError(f"`r` ({config.r}) must be less than or equal to in_features ({in_f}) (at {site.path!r})")
    variant = variant_of(config)
    if variant == "bat" and (in_f % config.r or out_f % config.r):
        raise ValueError(f"The weight matrix must be fully divisible into [r, r] blocks ({site.path!r}: "
                         f"({out_f}, {in_f}) with r={config.r}).")
    if variant == "mini" and out_f % config.mini_r:
        raise ValueError(f"mini_r is divided along the out_features dimension: out_features must be divisible by "
                         f"mini_r ({site.path!r}: {out_f} % {config.mini_r} != 0).")


def add_miss(module: nn.Module, site: Site, weight, config: MissConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: the variant's block, zeros (identity), or Kaiming-uniform for False."""
    out_f, _ = weight.shape
    variant = variant_of(config)
    if variant == "bat":
        block = torch.zeros(out_f // config.r, config.r, config.r)
    elif variant == "mini":
        block = torch.zeros(config.r, config.mini_r)
    else:
        block = torch.zeros(config.r, out_f)
        if config.init_weights is False:
            nn.init.kaiming_uniform_(block, a=math.sqrt(5))
    child_dict(module, "miss_block", nn.ParameterDict)[adapter] = nn.Parameter(
        block.to(weight.device, adapter_dtype(weight)))
    child_dict(module, "miss_dropout")[adapter] = (nn.Dropout(config.miss_dropout) if config.miss_dropout > 0
                                                   else nn.Identity())
    child_dict(module, "miss_gate")[adapter] = MissGate(variant, out_f, config.miss_dropout).to(weight.device)


# ----------------------------------------------------------------------------- the math (graph functions)


def full_block(block: torch.Tensor, out_features: int) -> torch.Tensor:
    """D (r, out): a mini block (r, mini_r) repeated along the output features; a balance block as is."""
    return block if block.shape[1] == out_features else block.repeat(1, out_features // block.shape[1])


def padded(x: torch.Tensor, r: int) -> torch.Tensor:
    """x zero-padded to a multiple of r features (before the dropout, as PEFT: the same draws)."""
    padding = (-x.shape[-1]) % r
    return F.pad(x, (0, padding)) if padding else x


def shard_delta(x: torch.Tensor, block: torch.Tensor, out_features: int) -> torch.Tensor:
    """PEFT's forward: the padded x's r-wide chunks summed, times D."""
    r = block.shape[0]
    return x.reshape(*x.shape[:-1], x.shape[-1] // r, r).sum(-2) @ full_block(block, out_features)


def shard_weight(block: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """ΔW (out, in) of a balance / mini adapter: ΔW[o, i] = D[i mod r, o]."""
    d = full_block(block, out_features).t()
    return d.repeat(1, -(-in_features // d.shape[1]))[:, :in_features]


def _blocks(weight: torch.Tensor, r: int) -> torch.Tensor:
    """W (out, in) as (in/r, out/r, r, r) blocks, PEFT's layout."""
    out_f, in_f = weight.shape
    return weight.reshape(out_f // r, r, in_f // r, r).permute(2, 0, 1, 3)


def _unblocks(blocks: torch.Tensor) -> torch.Tensor:
    n_in, n_out, r, _ = blocks.shape
    return blocks.permute(1, 2, 0, 3).reshape(n_out * r, n_in * r)


def bat_delta(weight: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: blocks(W) B + B, back in W's layout."""
    return _unblocks(_blocks(weight.to(block.dtype), block.shape[-1]) @ block + block)


# ----------------------------------------------------------------------------- lowering and merging


def _gate(lw: Lowering, site: Site, adapter: str, like):
    value = lw.attr(f"{site.path}.miss_gate.{adapter}.value")
    if lw.mixed:
        return lw.call(aten.mul.Tensor, value, lw.call(samples_of, lw.sample_index, lw.adapter_order.index(adapter),
                                                       like))
    return lw.call(aten.mul.Tensor, value, lw.gate(adapter))


def site_parts(gm, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype,
               alone: bool) -> Optional[SiteParts]:
    """The adapter at a linear site in eval, ungated: balance / mini as the low-rank ΔW = Dᵀ S (S (r, in) sums
    the inputs i with i mod r = k into k), bat as its dense ΔW of the weight as it is; None for bat not alone
    beside another bat adapter (they chain through the weight: the site computes as lowered)."""
    block = module.miss_block[adapter].detach().to(dtype)
    out_f, in_f = site_weight(gm, site).shape
    if module.miss_gate[adapter].variant == "bat":
        if not alone and sum(gate.variant == "bat" for gate in module.miss_gate.values()) > 1:
            return None
        weight = float_weight(module, site.weight[len(site.path) + 1:]).detach()
        return SiteParts(dense=bat_delta(weight.to(dtype), block))
    r = block.shape[0]
    sums = (torch.arange(in_f, device=block.device) % r == torch.arange(r, device=block.device)[:, None]).to(dtype)
    return SiteParts(down=sums, up=full_block(block, out_f))


def lower_site(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
    spec = site_weight(lw.root, site)
    out_f, in_f = spec.shape
    dtype, base_dtype = adapter_dtype(spec), spec.dtype
    x = lw.cast(site.input, dtype, base_dtype)
    output = site.output
    bat_total, weight = None, None  # dense graphs: bat adapters chain, Σ of their gated deltas so far
    for adapter in adapters:
        block = lw.attr(f"{site.path}.miss_block.{adapter}")
        if module.miss_gate[adapter].variant == "bat":
            if weight is None:
                weight = lw.call(float_weight, lw.attr(site.path), site.weight[len(site.path) + 1:])
                weight = lw.cast(weight, dtype, base_dtype)
            current = weight if bat_total is None or lw.mixed else lw.call(aten.add.Tensor, weight, bat_total)
            change = lw.call(bat_delta, current, block)
            if lw.mixed:  # each sample has one adapter: its map of the base weight
                value = lw.call(aten.mul.Tensor, lw.call(aten.linear.default, x, change), _gate(lw, site, adapter, x))
                output = lw.call(aten.add.Tensor, output, lw.cast(value, base_dtype, dtype))
                continue
            change = lw.call(aten.mul.Tensor, change, _gate(lw, site, adapter, x))
            bat_total = change if bat_total is None else lw.call(aten.add.Tensor, bat_total, change)
            continue
        dropped = lw.call(padded, x, module.miss_block[adapter].shape[0])
        if not isinstance(module.miss_dropout[adapter], nn.Identity):
            dropped = lw.call_module(f"{site.path}.miss_dropout.{adapter}", dropped)
        value = lw.call(aten.mul.Tensor, lw.call(shard_delta, dropped, block, out_f), _gate(lw, site, adapter, x))
        output = lw.call(aten.add.Tensor, output, lw.cast(value, base_dtype, dtype))
    if bat_total is not None:
        output = lw.call(aten.add.Tensor, output, lw.cast(lw.call(aten.linear.default, x, bat_total), base_dtype, dtype))
    return output


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    """PEFT's merge / unmerge: ± ΔW, or bat's map and its inverse ``(W - B)(I + B)^-1``."""
    block = module.miss_block[adapter].detach().float()
    w = weight.float()
    if module.miss_gate[adapter].variant != "bat":
        new = w + sign * shard_weight(block, *w.shape)
    elif sign > 0:
        new = w + bat_delta(w, block)
    else:
        inverse = torch.linalg.inv(torch.eye(block.shape[-1], device=block.device) + block)
        new = _unblocks((_blocks(w, block.shape[-1]) - block) @ inverse)
    return new.to(weight.dtype), bias


METHOD = register_method(weight_map(
    name="miss", config_type=MissConfig, create=add_miss, check_site=check_site, lower_site=lower_site, fold=fold,
    site_parts=site_parts,
    containers=("miss_block", "miss_dropout"), gates="miss_gate", kinds=("linear",),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, phase=50,
    describe=lambda module, adapter: f"{module.miss_gate[adapter].variant} {tuple(module.miss_block[adapter].shape)}"))
