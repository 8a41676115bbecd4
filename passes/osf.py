"""OSF (PEFT's tuners/osf: orthogonal subspace fine-tuning), on the additive form:

    W = U_high S_high V_high + U_low S_low V_low         (W's SVD in float32, split at effective_rank k)
    ΔW = U_low S_low V_low - U_low_init S_low_init V_low_init

on nn.Linear sites (and quantized linears). The top-k singular directions stay as they are; the
rest, ``<path>.osf_svd_params.<adapter>.U_low`` (out, m-k), ``S_low`` (m-k) and ``V_low`` (m-k, in),
PEFT's names, train, starting at their SVD values (ΔW = 0; ``init_weights=False``: N(0, 1) draws,
as PEFT's tests use). The initial low factors (and U_high or V_high where the factor is not square)
are frozen buffers on the gate, rebuilt from the base weight and never saved, as PEFT's.

Training keeps the update orthogonal to the frozen subspace as PEFT's gradient hooks do: U_low's and
V_low's gradients are projected, ``(I - U_high U_high^T) dU`` and ``dV (I - V_high^T V_high)``
(through U_low_init / V_low_init where the factor is square, as PEFT). Here the projection is an
identity function in the graph whose backward projects (:class:`OrthogonalGrad`), so it holds in
compiled graphs and copies of the module too.

``effective_rank`` (and ``rank_pattern``, regexes searched in the module path): an int, a float in
(0, 1] as a fraction of min(out, in), or None for half of it. Differences from PEFT, which cannot be
the oracle there: several active adapters all act (PEFT's unmerged forward uses the first one only,
its merge adds them all); unmerging works (PEFT refuses: it keeps no copy of the weight, fxpeft
subtracts ΔW); GPT-2's Conv1D and other layers raise (PEFT silently leaves them unadapted); a 4-bit
base is factored from its dequantized weight (PEFT takes the SVD of the packed bytes and fails).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict, resolve_targets
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj", "up_proj"]
# PEFT's TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING; other models default to "all-linear", as PEFT
DEFAULT_OSF_TARGETS = {
    **{name: _ALL for name in ("llama", "llama4", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text", "qwen2",
                               "qwen3", "phi")},
    "gpt2": ["c_attn", "c_proj"], "bloom": ["query_key_value", "dense_4h_to_h"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "gptj": ["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"], "falcon": ["query_key_value", "dense_4h_to_h"],
    "gpt_bigcode": ["c_attn", "c_proj"],
}


@dataclass
class OSFConfig(PeftConfigBase):
    """PEFT's OSFConfig: ``effective_rank`` (the preserved rank), ``target_modules``,
    ``rank_pattern``, ``init_weights``, ``modules_to_save`` and ``target_svd_config`` (accepted and
    ignored, as in PEFT). PEFT's OSFConfig has no other fields and no checks of its own."""

    effective_rank: Optional[Union[int, float]] = None
    target_modules: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = None
    init_weights: Optional[bool] = True
    modules_to_save: Optional[list[str]] = None
    target_svd_config: Optional[dict] = None

    peft_type = "OSF"


def preserved_rank(config: OSFConfig, path: str, min_dim: int) -> int:
    """PEFT's ``_resolve_rank``, the first ``rank_pattern`` regex found in the path overriding."""
    value = config.effective_rank
    for pattern, rank in (config.rank_pattern or {}).items():
        if re.search(pattern, path):
            value = rank
            break
    if value is None:
        return max(min_dim // 2, 0)
    rank = int(min_dim * value) if isinstance(value, float) and 0 < value <= 1 else int(value)
    return max(min(min_dim, rank), 0)


class OsfGate(AdapterGate):
    """The form's gate plus the frozen factors (non-persistent buffers): the initial low-rank
    ``U_low_init``, ``S_low_init``, ``V_low_init`` and, where that factor is not square, ``U_high`` or
    ``V_high`` for projecting gradients."""

    def __init__(self, frozen: dict):
        super().__init__(1.0)
        for name, tensor in frozen.items():
            self.register_buffer(name, tensor, persistent=False)


class OrthogonalGrad(torch.autograd.Function):
    """The identity, whose backward projects the gradient as PEFT's OSF hooks do: ``left`` for U
    (basis rows: out), else V (basis columns: in); ``keep`` keeps the basis' span (a square factor's
    initial low part), otherwise it is removed (the stored high part)."""

    @staticmethod
    def forward(ctx, factor, basis, left: bool, keep: bool):
        ctx.save_for_backward(basis)
        ctx.left, ctx.keep = left, keep
        return factor.view_as(factor)

    @staticmethod
    def backward(ctx, grad):
        (basis,) = ctx.saved_tensors
        if ctx.left:
            part = basis @ (basis.transpose(0, 1) @ grad)
        else:
            part = (grad @ basis.transpose(0, 1)) @ basis
        return (part if ctx.keep else grad - part), None, None, None


def osf_delta(x, u, s, v, gate: OsfGate):
    """PEFT's factored forward: ``x [V; V_init]^T [U S, -U_init S_init]^T``, with U's and V's
    gradients projected."""
    u = OrthogonalGrad.apply(u, gate.U_high, True, False) if hasattr(gate, "U_high") else OrthogonalGrad.apply(
        u, gate.U_low_init, True, True)
    v = OrthogonalGrad.apply(v, gate.V_high, False, False) if hasattr(gate, "V_high") else OrthogonalGrad.apply(
        v, gate.V_low_init, False, True)
    left = torch.cat([u * s.unsqueeze(0), -(gate.U_low_init * gate.S_low_init.unsqueeze(0))], dim=1)
    right = torch.cat([v, gate.V_low_init], dim=0)
    return F.linear(F.linear(x.to(left.dtype), right), left)


def check_site(module: nn.Module, site: Site, weight_spec, config: OSFConfig) -> None:
    name = f"{site.path!r} ({type(module).__name__})"
    if site.kind != "linear" or site.fan_in_fan_out:
        raise ValueError(f"OSF adapts torch.nn.Linear layers only, not {name} (PEFT leaves such a layer unadapted "
                         "without a word). Leave it out of target_modules.")
    rank = preserved_rank(config, site.path, min(weight_spec.shape))
    if rank <= 0:
        raise ValueError(f"`effective_rank` should be a positive integer value but the value passed is {rank} "
                         f"(at {name}).")


def add_osf(module: nn.Module, site: Site, weight_spec, config: OSFConfig, adapter: str) -> None:
    """PEFT's ``decompose_weight_matrix``: float32 SVD, factors rounded to the base's dtype (then held
    in the adapter's), the trainable ones drawn anew with ``init_weights=False``."""
    weight = float_weight(module)
    base_dtype, dtype, device = weight_spec.dtype, adapter_dtype(weight_spec), weight_spec.device
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    k = min(preserved_rank(config, site.path, min(weight_spec.shape)), s.shape[0])
    parts = {"U_high": u[:, :k], "V_high": vh[:k, :], "U_low": u[:, k:], "S_low": s[k:], "V_low": vh[k:, :]}
    parts = {n: t.contiguous().to(device, base_dtype).to(dtype) for n, t in parts.items()}
    out_features, in_features = weight_spec.shape
    frozen = {f"{n}_init": parts[n].clone() for n in ("U_low", "S_low", "V_low")}
    if out_features > in_features:  # U is not square: its complement needs U_high
        frozen["U_high"] = parts["U_high"]
    if in_features > out_features:
        frozen["V_high"] = parts["V_high"]
    trainable = {n: torch.randn_like(parts[n]) if config.init_weights is False else parts[n]
                 for n in ("U_low", "S_low", "V_low")}
    child_dict(module, "osf_svd_params")[adapter] = nn.ParameterDict(
        {n: nn.Parameter(t) for n, t in trainable.items()})
    child_dict(module, "osf_gate")[adapter] = OsfGate(frozen).to(device)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    params = f"{site.path}.osf_svd_params.{adapter}"
    return lw.call(osf_delta, x, lw.attr(f"{params}.U_low"), lw.attr(f"{params}.S_low"), lw.attr(f"{params}.V_low"),
                   lw.attr(f"{site.path}.osf_gate.{adapter}"))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight``: the current low-rank part minus its start."""
    p, gate = module.osf_svd_params[adapter], module.osf_gate[adapter]
    current = torch.mm(p["U_low"] * p["S_low"].unsqueeze(0), p["V_low"])
    return current - torch.mm(gate.U_low_init * gate.S_low_init.unsqueeze(0), gate.V_low_init)


def resolve(gm, sites, config: OSFConfig) -> OSFConfig:
    model_type = getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)
    if config.target_modules is None and model_type not in DEFAULT_OSF_TARGETS:  # PEFT: every linear layer
        config = dataclasses.replace(config, target_modules="all-linear")
    return resolve_targets(gm, sites, config, DEFAULT_OSF_TARGETS, output_heads)


METHOD = register_method(additive(
    name="osf", config_type=OSFConfig, create=add_osf, delta=delta, delta_weight=delta_weight,
    containers=("osf_svd_params",), gates="osf_gate", kinds=("linear",), check_site=check_site,
    dtype_of=lambda module, adapter: module.osf_svd_params[adapter]["U_low"].dtype, resolve_config=resolve,
    describe=lambda module, adapter: f"trainable rank={module.osf_svd_params[adapter]['S_low'].numel()}"))
