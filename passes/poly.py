"""Poly (Polytropon) and Multi-Head Routing, PEFT's tuners/poly, on the additive form:

    w = route(task_ids)                                  (batch, n_splits, n_skills), each split's weights sum to 1
    A_b = Σ_s w[b, q, s] A[q, s]   B_b = Σ_s w[b, q, s] B[q, s]   per split q, joined over the splits
    Δ(x_b) = x_b A_b B_b / r                             A_b (in, r), B_b (r, out)

at linear sites (nn.Linear, as PEFT). The router is a learned logit table ``module_logits`` (n_tasks,
n_splits·n_skills) per site: in training the routing is a relaxed-Bernoulli sample (temperature 1), in
eval its sigmoid; each split's weights are then normalised (sum + 1e-12). ``task_ids`` is a per-call input
(``Method.call_inputs``): the graphs take it as data. State, PEFT's names: ``<path>.poly_lora_A.<adapter>``
(n_splits, n_skills, in/n_splits, r), ``poly_lora_B.<adapter>`` (n_splits, n_skills, r, out/n_splits),
``poly_router.<adapter>.module_logits``, and the form's gate ``poly_gate.<adapter>`` (not saved). Init as
PEFT: each A[q, s] nn.Linear's Kaiming-uniform, B zeros (``init_weights=False``: Kaiming-uniform too), the
logits uniform in ±1e-3. No merging: ΔW depends on each sample's task (PEFT's Poly layers cannot merge).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import nn
from torch.distributions.relaxed_bernoulli import RelaxedBernoulli

from fxpeft.canonical import Site
from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

EPS = 1e-12


@dataclass
class PolyConfig(PeftConfigBase):
    """PEFT's PolyConfig: ``r`` (8), ``poly_type`` ("poly"), ``n_tasks`` (1), ``n_skills`` (4), ``n_splits``
    (1; more is Multi-Head Routing), ``init_weights`` and the targeting fields."""

    r: int = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    poly_type: Literal["poly"] = "poly"
    n_tasks: int = 1
    n_skills: int = 4
    n_splits: int = 1

    peft_type = "POLY"

    def __post_init__(self):
        super().__post_init__()
        # PEFT raises these when the layers are built, in these words; a config that cannot build is refused at once
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"`r` should be a positive integer value but the value passed is {self.r}")
        if self.poly_type != "poly":
            raise ValueError(f"Unsupported poly_type: {self.poly_type}. Currently, only the following types are "
                             "supported: `poly`.")
        for name in ("n_tasks", "n_skills", "n_splits"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PolyConfig.{name} must be a positive integer, got {value!r}.")


class PolyRouter(nn.Module):
    """PEFT's PolyRouter: each sample's skill weights per split, from its task's logits."""

    def __init__(self, config: PolyConfig):
        super().__init__()
        self.n_tasks, self.n_splits, self.n_skills = config.n_tasks, config.n_splits, config.n_skills
        self.module_logits = nn.Parameter(torch.empty((config.n_tasks, config.n_splits * config.n_skills)))
        nn.init.uniform_(self.module_logits, -1e-3, 1e-3)

    def forward(self, task_ids: Optional[torch.Tensor]) -> torch.Tensor:
        if task_ids is None:  # the dispatcher asks for task_ids while the adapter acts; an inactive one reads none
            task_ids = torch.zeros(1, dtype=torch.long, device=self.module_logits.device)
        elif not torch.compiler.is_compiling() and task_ids.numel() and int(task_ids.max()) >= self.n_tasks:
            raise ValueError(f"Only {self.n_tasks} tasks available. Found task id = {int(task_ids.max())}")
        logits = self.module_logits[task_ids.to(self.module_logits.device)].view(-1, self.n_splits, self.n_skills)
        if self.training:
            logits = RelaxedBernoulli(temperature=1.0, logits=logits).rsample()
        else:
            logits = torch.sigmoid(logits)
        return logits / (logits.sum(dim=-1, keepdim=True) + EPS)


def check_site(module: nn.Module, site: Site, weight, config: PolyConfig) -> None:
    if site.fan_in_fan_out or not isinstance(module, nn.Linear):
        raise TypeError(f"Target module {site.path!r} ({type(module).__name__}) is not supported. Currently, only the "
                        "following modules are supported: `torch.nn.Linear`.")
    out_f, in_f = weight.shape
    if in_f % config.n_splits or out_f % config.n_splits:
        raise ValueError(f"n_splits={config.n_splits} must divide the features of {site.path!r} ({in_f} in, "
                         f"{out_f} out): each split routes its share of them.")


def _kaiming_transposed(rows: int, cols: int) -> torch.Tensor:
    """nn.Linear's init of a (rows, cols) weight, transposed (PEFT draws each skill's factor so)."""
    param = torch.empty((rows, cols))
    nn.init.kaiming_uniform_(param, a=math.sqrt(5))
    return param.T


def add_poly(module: nn.Module, site: Site, weight, config: PolyConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` and ``reset_poly_parameters``: same shapes, same draws in the same order."""
    out_f, in_f = weight.shape
    q, s, r = config.n_splits, config.n_skills, config.r
    a, b = torch.empty(q, s, in_f // q, r), torch.empty(q, s, r, out_f // q)
    for skill in range(s):
        for split in range(q):
            a[split, skill] = _kaiming_transposed(r, in_f // q)
    if config.init_weights:
        nn.init.zeros_(b)
    else:
        for skill in range(s):
            for split in range(q):
                b[split, skill] = _kaiming_transposed(out_f // q, r)
    router = PolyRouter(config)
    dtype = adapter_dtype(weight)
    child_dict(module, "poly_lora_A", nn.ParameterDict)[adapter] = nn.Parameter(a.to(weight.device, dtype))
    child_dict(module, "poly_lora_B", nn.ParameterDict)[adapter] = nn.Parameter(b.to(weight.device, dtype))
    child_dict(module, "poly_router")[adapter] = router.to(weight.device, dtype)
    child_dict(module, "poly_gate")[adapter] = AdapterGate(1.0).to(weight.device)


def poly_delta(x: torch.Tensor, weights: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """PEFT's forward: the samples' mixed factors, then x A B / r per sample (x: batch first)."""
    batch, r = weights.shape[0], a.shape[-1]
    mixed_a = torch.einsum("bqs,qsdr->bqdr", weights, a).reshape(batch, -1, r)
    mixed_b = torch.einsum("bqs,qsrd->bqrd", weights, b).transpose(1, 2).reshape(batch, r, -1)
    if weights.shape[0] != x.shape[0]:  # a graph computing without task_ids: no sample is routed (gate 0)
        mixed_a, mixed_b = mixed_a[:1].expand(x.shape[0], -1, -1), mixed_b[:1].expand(x.shape[0], -1, -1)
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return (flat.bmm(mixed_a).bmm(mixed_b) / r).reshape(*x.shape[:-1], -1)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    weights = lw.call_module(f"{site.path}.poly_router.{adapter}", lw.call_input("task_ids"))
    return lw.call(poly_delta, x, weights, lw.attr(f"{site.path}.poly_lora_A.{adapter}"),
                   lw.attr(f"{site.path}.poly_lora_B.{adapter}"))


def delta_weight(gm, site: Site, module: nn.Module, adapter: str):
    raise ValueError(f"Poly adapter {adapter!r} cannot be merged: its weight change depends on each sample's task "
                     "(PEFT's Poly layers have no merge either). Keep it unmerged.")


METHOD = register_method(additive(
    name="poly", config_type=PolyConfig, create=add_poly, delta=delta, delta_weight=delta_weight,
    containers=("poly_lora_A", "poly_lora_B", "poly_router"), gates="poly_gate", kinds=("linear",),
    check_site=check_site, dtype_of=lambda module, adapter: module.poly_lora_A[adapter].dtype,
    # generation graphs run the plain lowering (a kept ΔW cannot hold a per-sample routing)
    lower_site=lambda lw, site, module, adapters: None,
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, call_inputs=("task_ids",),
    describe=lambda module, adapter: "r={}, n_skills={}, n_splits={}".format(
        module.poly_lora_A[adapter].shape[-1], *module.poly_lora_A[adapter].shape[1::-1])))
