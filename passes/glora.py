"""GLoRA (generalized LoRA), PEFT's tuners/glora: each adapter changes a linear site's weight and bias as

    W' = W + W ⊙ A + B            b' = b + b ⊙ D + E + W C

so its contribution is additive, ``Δ(x) = x (W ⊙ A + B)^T + (b ⊙ D + E + W C)``, computed against the
site's own weight W (PEFT sums several active adapters' contributions, each against W). Each of A … E is
a *path* chosen by the config: ``lora`` (``Xd @ Xu``), ``vector`` (``X``, one value per output feature
for A, B, D, E, per input feature for C), ``constant`` (one scalar ``X``), ``none`` (a ``zeros`` buffer,
saved as PEFT saves it). C, D and E exist only on sites with a bias. State: ``<path>.glora_A.<adapter>``
… ``glora_E`` (PEFT's names: ``…glora_A.Xd`` in files), ``<path>.glora_gate.<adapter>`` (the form's
gate, not saved).

On the additive form through passes/weight_delta.py, because merging is not a plain ΔW: the fold writes
W + W0 ⊙ A + B (and the bias) with W0 the weight before any GLoRA adapter of the site was merged, as PEFT
re-merges every adapter against the original weight, and unmerging subtracts exactly what merging added
(PEFT divides by 1 + A instead). Sites: nn.Linear, as PEFT (which refuses every other
layer type, GPT-2's Conv1D included); beyond PEFT, fxpeft's quantized linears (W is their dequantized
weight). Mixed batches as PEFT's ``adapter_names``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import weight_delta

PATHS = ("glora_A", "glora_B", "glora_C", "glora_D", "glora_E")
VALID = {"config_A_B": ("lora", "vector", "constant", "none"), "config_C": ("lora", "vector", "none"),
         "config_D_E": ("vector", "constant", "none")}


@dataclass
class GloraConfig(PeftConfigBase):
    """PEFT's GloraConfig: ``r`` (8, the rank of ``lora`` paths), ``config_A_B`` ("lora"),
    ``config_C`` ("lora"), ``config_D_E`` ("constant"), ``init_weights`` (True: the identity start),
    ``bias``, targeting (``target_modules``, ``modules_to_save``; PEFT's GloraConfig has no
    ``exclude_modules`` or ``layers_to_transform``)."""

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    config_A_B: str = "lora"
    config_C: str = "lora"
    config_D_E: str = "constant"
    init_weights: bool = True

    peft_type = "GLORA"

    def __post_init__(self):
        super().__post_init__()
        for name, valid in VALID.items():  # PEFT's checks, PEFT's words
            if getattr(self, name) not in valid:
                raise ValueError(f"Invalid {name} value: {getattr(self, name)!r}. Valid values are: "
                                 f"{', '.join(sorted(valid))}.")
        # what PEFT does not check (a non-positive r fails in torch.zeros; an unknown bias is ignored)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r!r}.")
        check_bias(self, "glora_only")


class LowRankPath(nn.Module):
    """``Xd @ Xu``: (rows, r) @ (r, cols)."""

    def __init__(self, rows: int, cols: int, r: int, init_weights: bool):
        super().__init__()
        self.Xd = nn.Parameter(torch.zeros(rows, r))
        self.Xu = nn.Parameter(torch.zeros(r, cols))
        nn.init.kaiming_uniform_(self.Xu, a=math.sqrt(5))  # PEFT's order of draws: Xu, then Xd
        if not init_weights:
            nn.init.kaiming_uniform_(self.Xd, a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.Xd @ self.Xu


class VectorPath(nn.Module):
    """``X``: a column (features, 1) broadcast over a matrix's columns, or a bias-shaped (features,)."""

    def __init__(self, features: int, column: bool, init_weights: bool):
        super().__init__()
        self.X = nn.Parameter(torch.zeros((features, 1) if column else (features,)))
        if not init_weights:  # PEFT's kaiming on a (1, features) view of a 1-d vector
            nn.init.kaiming_uniform_(self.X if column else self.X.unsqueeze(0), a=math.sqrt(5))

    def forward(self) -> torch.Tensor:
        return self.X


class ConstantPath(nn.Module):
    def __init__(self, init_weights: bool):
        super().__init__()
        self.X = nn.Parameter(torch.zeros(1))
        if not init_weights:
            nn.init.normal_(self.X, mean=0.0, std=0.02)

    def forward(self) -> torch.Tensor:
        return self.X[0]


class NoPath(nn.Module):
    """A disabled path: zeros, kept as a (saved) buffer as PEFT keeps it."""

    def __init__(self, *shape: int):
        super().__init__()
        self.register_buffer("zeros", torch.zeros(shape))

    def forward(self) -> torch.Tensor:
        return self.zeros


def make_paths(out_f: int, in_f: int, has_bias: bool, config: GloraConfig) -> dict[str, nn.Module]:
    """PEFT's ``update_layer``: A, B, C, D, E in that order (the order of the random draws)."""
    init, r, paths = config.init_weights, config.r, {}
    for name in ("glora_A", "glora_B"):
        paths[name] = {"lora": lambda: LowRankPath(out_f, in_f, r, init),
                       "vector": lambda: VectorPath(out_f, True, init),
                       "constant": lambda: ConstantPath(init),
                       "none": lambda: NoPath(out_f, in_f)}[config.config_A_B]()
    c_kind = config.config_C if has_bias else "none"
    paths["glora_C"] = {"lora": lambda: LowRankPath(in_f, 1, r, init), "vector": lambda: VectorPath(in_f, True, init),
                        "none": lambda: NoPath(in_f, 1)}[c_kind]()
    de_kind = config.config_D_E if has_bias else "none"
    for name in ("glora_D", "glora_E"):
        paths[name] = {"vector": lambda: VectorPath(out_f, False, init), "constant": lambda: ConstantPath(init),
                       "none": lambda: NoPath(out_f)}[de_kind]()
    return paths


def check_site(module: nn.Module, site: Site, weight_spec, config: GloraConfig) -> None:
    if site.fan_in_fan_out:
        raise ValueError(f"GLoRA supports nn.Linear layers, not transformers' Conv1D such as {site.path!r} (PEFT "
                         "raises too). Leave it out of target_modules.")


def add_glora(module: nn.Module, site: Site, weight_spec, config: GloraConfig, adapter: str) -> None:
    out_f, in_f = weight_spec.shape
    dtype = adapter_dtype(weight_spec)
    for name, path in make_paths(out_f, in_f, site.bias is not None, config).items():
        child_dict(module, name)[adapter] = path.to(weight_spec.device, dtype)
    child_dict(module, "glora_gate")[adapter] = AdapterGate(1.0).to(weight_spec.device)


def terms(site_module: nn.Module, adapter: str, dtype: torch.dtype) -> list[torch.Tensor]:
    """A, B, C, D, E of one adapter (gradients flowing to their parameters)."""
    return [site_module._modules[name][adapter]().to(dtype) for name in PATHS]


def glora_delta(site_module: nn.Module, adapter: str, x: torch.Tensor, weight: torch.Tensor,
                bias: Optional[torch.Tensor], output) -> torch.Tensor:
    """``x (W ⊙ A + B)^T + (b ⊙ D + E + W C)``: what the adapter adds to the site's output."""
    a, b, c, d, e = terms(site_module, adapter, x.dtype)
    weight = weight.to(x.dtype)
    out = torch.nn.functional.linear(x, weight * a + b)
    if bias is None:
        return out
    return out + (bias.to(x.dtype) * d + e + (weight @ c).squeeze(-1))


def glora_change(site_module: nn.Module, adapter: str, w0: torch.Tensor, b0: Optional[torch.Tensor]):
    """Merging: ``W0 ⊙ A + B`` and ``b0 ⊙ D + E + W0 C`` (PEFT's merge, against the unmerged weight)."""
    a, b, c, d, e = terms(site_module, adapter, w0.dtype)
    return w0 * a + b, (b0 * d + e + (w0 @ c).squeeze(-1) if b0 is not None else None)


def describe(module: nn.Module, adapter: str) -> str:
    kinds = {LowRankPath: "lora", VectorPath: "vector", ConstantPath: "constant", NoPath: "none"}
    a, c, d = (kinds[type(module._modules[name][adapter])] for name in ("glora_A", "glora_C", "glora_D"))
    rank = f"r={module.glora_A[adapter].Xd.shape[1]} " if a == "lora" else ""
    return f"{rank}A,B={a} C={c} D,E={d}"


METHOD = register_method(weight_delta.method(
    name="glora", config_type=GloraConfig, create=add_glora, check_site=check_site, gates="glora_gate",
    delta=glora_delta, change=glora_change, containers=PATHS, kinds=("linear",),
    dtype_of=lambda module, adapter: next(iter(module.glora_A[adapter].state_dict().values())).dtype,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, describe=describe))
