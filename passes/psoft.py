"""PSOFT (PEFT's tuners/psoft: orthogonal fine-tuning in the principal subspace), on the additive form:

    Δ(x) = s · ((x A^T) R^T - x A^T) B^T          ΔW = s · B (R - I) A,      s = psoft_alpha / r

on nn.Linear sites (and quantized linears), as PEFT. A (r, in) and B (out, r) span W's top-r
singular subspace and stay frozen: from ``U, S, Vh = svd(W)`` in float32 (``psoft_svd="full"``:
``torch.linalg.svd``; ``"lowrank"``: ``torch.svd_lowrank`` seeded with ``random_seed`` on a forked
RNG), ``psoft_init``: A = Vh[:r], B = U[:, :r] diag(S[:r] / s); ``pissa_init``: both take
``sqrt(S[:r] / s)``. They are PEFT's non-persistent caches: not saved, rebuilt from the base
weight when an adapter is made or loaded (kept on the gate: ``<path>.psoft_gate.<adapter>.A/.B``).

What trains is ``<path>.psoft_R.<adapter>`` (PEFT's names): with ``psoft_orth`` R is the Cayley
transform (I + Q)(I - Q)^-1 of the skew-symmetric Q filled from ``weight`` (r(r-1)/2 entries; the
Cayley-Neumann series with ``use_cayley_neumann``), otherwise ``weight`` is R itself (r, r);
``vector_b`` and ``vector_a`` (``psoft_mag_b`` / ``psoft_mag_a``) scale its rows and columns. The
default init is R = I (ΔW = 0). A quantized base is factored from its dequantized weight (PEFT
refuses to take the SVD of a packed weight).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict, resolve_targets
from fxpeft.registry import register_method
from fxpeft.targets import output_heads


@dataclass
class PsoftConfig(PeftConfigBase):
    """PEFT's PsoftConfig: its fields, defaults, checks and warnings."""

    r: int = 32
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    psoft_alpha: int = 32
    psoft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    ab_svd_init: str = "psoft_init"
    psoft_svd: str = "full"
    psoft_svd_lowrank_niter: int = 10
    random_seed: int = 0
    psoft_orth: bool = True
    psoft_mag_b: bool = True
    psoft_mag_a: bool = True
    use_cayley_neumann: bool = False
    num_cayley_neumann_terms: int = 5
    cayley_neumann_eps: Optional[float] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "PSOFT"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks and warnings, PEFT's words
        check_layer_fields(self)
        if self.r <= 0:
            raise ValueError(f"`r` must be a positive integer; got {self.r}.")
        if self.ab_svd_init not in ("psoft_init", "pissa_init"):
            raise ValueError(f"`ab_svd_init` must be one of ['pissa_init', 'psoft_init']; got {self.ab_svd_init!r}.")
        if self.psoft_svd not in ("full", "lowrank"):
            raise ValueError(f"`psoft_svd` must be one of ['full', 'lowrank']; got {self.psoft_svd!r}.")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.psoft_svd != "lowrank" and self.psoft_svd_lowrank_niter != defaults["psoft_svd_lowrank_niter"]:
            warnings.warn(f"`psoft_svd_lowrank_niter` is only used when `psoft_svd='lowrank'`. Got "
                          f"psoft_svd={self.psoft_svd!r}, so psoft_svd_lowrank_niter={self.psoft_svd_lowrank_niter} "
                          "will be ignored.", UserWarning)
        if self.use_cayley_neumann:
            if self.num_cayley_neumann_terms <= 0:
                raise ValueError(
                    f"`num_cayley_neumann_terms` must be a positive integer; got {self.num_cayley_neumann_terms}.")
            if self.cayley_neumann_eps is not None and not (0.0 < self.cayley_neumann_eps < 1.0):
                raise ValueError(f"`cayley_neumann_eps` must be in (0, 1) when set; got {self.cayley_neumann_eps}.")
        else:
            if self.num_cayley_neumann_terms != defaults["num_cayley_neumann_terms"]:
                warnings.warn("`num_cayley_neumann_terms` is only used when `use_cayley_neumann=True`. Since "
                              f"`use_cayley_neumann=False`, `num_cayley_neumann_terms={self.num_cayley_neumann_terms}` "
                              "will be ignored.", UserWarning)
            if self.cayley_neumann_eps is not None:
                warnings.warn("`cayley_neumann_eps` is only used when `use_cayley_neumann=True`. Since "
                              f"`use_cayley_neumann=False`, `cayley_neumann_eps={self.cayley_neumann_eps}` will be "
                              "ignored.", UserWarning)


class PsoftR(nn.Module):
    """PEFT's OrthLayer: the r × r matrix R from ``weight`` (and the magnitude vectors)."""

    def __init__(self, config: PsoftConfig):
        super().__init__()
        size = self.size = config.r
        self.orth = config.psoft_orth
        self.terms = int(config.num_cayley_neumann_terms) if config.use_cayley_neumann else None
        self.eps = config.cayley_neumann_eps
        if self.orth:
            self.weight = nn.Parameter(torch.empty(size * (size - 1) // 2))
            rows, cols = torch.triu_indices(size, size, 1)
            self.register_buffer("rows", rows, persistent=False)
            self.register_buffer("cols", cols, persistent=False)
        else:
            self.weight = nn.Parameter(torch.empty(size, size))
        self.vector_b = nn.Parameter(torch.empty(size)) if config.psoft_mag_b else None
        self.vector_a = nn.Parameter(torch.empty(size)) if config.psoft_mag_a else None

    def reset(self, init_weights: bool) -> None:
        """PEFT's ``reset_parameters``: R = I, or a random start near it (N(0, 0.1) draws)."""
        with torch.no_grad():
            if self.orth:
                self.weight.zero_() if init_weights else nn.init.normal_(self.weight, mean=0.0, std=0.1)
            else:
                nn.init.eye_(self.weight)
                if not init_weights:
                    self.weight.add_(torch.randn_like(self.weight) * 0.1)
            for vector in (self.vector_b, self.vector_a):
                if vector is not None:
                    vector.fill_(1.0)

    def matrix(self) -> torch.Tensor:
        """PEFT's ``get_matrix``: Cayley R = (I + Q)(I - Q)^-1 (float32 solve for half dtypes), or its
        Neumann series I + 2Q + 2Q² + … + Q^(t-1), or the free matrix; then diag(b) R diag(a)."""
        if not self.orth:
            r = self.weight
            back = None
        else:
            q = torch.zeros((self.size, self.size), device=self.weight.device, dtype=self.weight.dtype)
            q = q.index_put((self.rows, self.cols), self.weight)
            q = q - q.transpose(0, 1)
            back = q.dtype if q.dtype in (torch.float16, torch.bfloat16) and self.terms is None else None
            eye = torch.eye(self.size, device=q.device, dtype=q.dtype)
            if self.terms is not None:
                r = neumann(q, eye, self.terms, self.eps)
            else:
                if back is not None:
                    q, eye = q.float(), eye.float()
                r = torch.linalg.solve(eye - q, eye + q, left=False)
        if self.vector_b is not None:
            r = self.vector_b[:, None] * r
        if self.vector_a is not None:
            r = r * self.vector_a[None, :]
        return r if back is None else r.to(back)

    def extra_repr(self) -> str:
        return f"size={self.size}, orth={self.orth}, cayley_neumann_terms={self.terms}"


def neumann(q: torch.Tensor, eye: torch.Tensor, terms: int, eps: Optional[float]) -> torch.Tensor:
    """PEFT's truncated series for the Cayley transform (Q first scaled to Frobenius norm ``eps``
    where it is larger, with ``cayley_neumann_eps``)."""
    if eps is not None:
        norm = torch.linalg.norm(q, ord="fro")
        q = torch.where(torch.isfinite(norm) & (norm > eps), q * (eps / (norm + 1e-12)), q)
    r = eye
    if terms > 1:
        r = r + 2.0 * q
        if terms > 2:
            power = q @ q
            r = r + 2.0 * power
            for _ in range(3, terms - 1):
                power = power @ q
                r = r + 2.0 * power
            r = r + power @ q
    return r


class PsoftGate(AdapterGate):
    """The form's gate (``value``: psoft_alpha / r) plus the frozen A (r, in) and B (out, r),
    non-persistent buffers as PEFT's ``_psoft_A_cache`` / ``_psoft_B_cache``."""

    def __init__(self, scale: float, dropout: float, a: torch.Tensor, b: torch.Tensor):
        super().__init__(scale, dropout)
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


def principal_subspace(weight: torch.Tensor, config: PsoftConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_build_psoft_ab_cache_buffers``: A (r, in), B (out, r) from W's SVD in float32."""
    w, r = weight.detach().float(), config.r
    if config.psoft_svd == "full":
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r, :]
    else:  # torch.svd_lowrank draws a random projection: seeded on a forked RNG, as PEFT
        devices = {"devices": []} if w.device.type == "cpu" else {"devices": [w.device], "device_type": w.device.type}
        with torch.random.fork_rng(**devices):
            torch.manual_seed(config.random_seed)
            u, s, v = torch.svd_lowrank(w, q=r, niter=config.psoft_svd_lowrank_niter)
        u, s, vh = u[:, :r], s[:r], v[:, :r].t()
    s = s / (config.psoft_alpha / r)
    if config.ab_svd_init == "psoft_init":
        a, b = vh, u @ torch.diag(s)
    else:
        root = torch.sqrt(s)
        a, b = torch.diag(root) @ vh, u @ torch.diag(root)
    return a.contiguous(), b.contiguous()


def check_site(module: nn.Module, site: Site, weight_spec, config: PsoftConfig) -> None:
    name = f"{site.path!r} ({type(module).__name__})"
    if site.kind != "linear" or site.fan_in_fan_out:
        raise ValueError(f"Target module {name} is not supported by PSOFT: as in PEFT, only torch.nn.Linear is "
                         "supported. Leave it out of target_modules.")
    out_features, in_features = weight_spec.shape
    if config.r > min(in_features, out_features):
        raise ValueError(f"`r` ({config.r}) must be less than or equal to min(in_features, out_features) "
                         f"({in_features}, {out_features}) ({name}).")


def add_psoft(module: nn.Module, site: Site, weight_spec, config: PsoftConfig, adapter: str) -> None:
    dtype, device = adapter_dtype(weight_spec), weight_spec.device
    rotation = PsoftR(config).to(device, dtype)
    rotation.reset(config.init_weights)  # PEFT's draws (R's), before the SVD, which draws nothing globally
    child_dict(module, "psoft_R")[adapter] = rotation
    child_dict(module, "psoft_dropout")[adapter] = (
        nn.Dropout(config.psoft_dropout) if config.psoft_dropout > 0 else nn.Identity())
    weight = float_weight(module)
    a, b = principal_subspace(weight, config)
    child_dict(module, "psoft_gate")[adapter] = PsoftGate(
        config.psoft_alpha / config.r, config.psoft_dropout, a.to(dtype), b.to(dtype)).to(device)


def resolve(gm, sites, config: PsoftConfig) -> PsoftConfig:
    if config.fan_in_fan_out:  # PEFT adapts nn.Linear only, and turns the flag off
        warnings.warn("fan_in_fan_out=True is not compatible with `torch.nn.Linear`. Setting fan_in_fan_out=False.")
        config = dataclasses.replace(config, fan_in_fan_out=False)
    return resolve_targets(gm, sites, config, DEFAULT_LORA_TARGETS, output_heads)


def psoft_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rotation: PsoftR) -> torch.Tensor:
    """``(x A^T R^T - x A^T) B^T``, in PEFT's order."""
    xa = x @ a.t()
    return (xa @ rotation.matrix().to(xa.dtype).t() - xa) @ b.t()


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    gate = f"{site.path}.psoft_gate.{adapter}"
    rotation = lw.attr(f"{site.path}.psoft_R.{adapter}")
    return lw.call(psoft_delta, x, lw.attr(f"{gate}.A"), lw.attr(f"{gate}.B"), rotation)


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    gate, rotation = module.psoft_gate[adapter], module.psoft_R[adapter]
    r = rotation.matrix().to(gate.A.dtype)
    return gate.B @ (r - torch.eye(r.shape[0], device=r.device, dtype=r.dtype)) @ gate.A * gate.scale


METHOD = register_method(additive(
    name="psoft", config_type=PsoftConfig, create=add_psoft, delta=delta, delta_weight=delta_weight,
    containers=("psoft_R", "psoft_dropout"), gates="psoft_gate", dropouts="psoft_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.psoft_gate[adapter].A.dtype, check_site=check_site,
    resolve_config=resolve,
    describe=lambda module, adapter: f"r={module.psoft_R[adapter].size}"))
