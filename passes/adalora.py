"""AdaLoRA's math, PEFT-exact: config, SVD-form delta, rank allocator, orthogonal regulariser.

AdaLoRA adapts a linear ``W`` with ``delta = B @ (A * E) * s / (ranknum + 1e-5)`` (``A``: (r, in)
right singular vectors, ``E``: (r, 1) singular values, ``B``: (out, r) left singular vectors,
``s = lora_alpha`` or ``r`` when ``lora_alpha <= 0``, ``ranknum`` the *initial* rank ``init_r``).
During training a :class:`RankAllocator` scores every triplet ``(A[i], E[i], B[:, i])`` and zeroes
the ``E`` entries of the least important ones until the total rank falls to ``target_r`` per
site, following a cubic budget schedule; the loss gets an orthogonality penalty on ``A`` and ``B``.

No graph code here: the pass that attaches AdaLoRA sites calls these functions. The allocator
works on an explicit mapping ``sites = {module_path: (A, E, B)}`` of parameters (with ``.grad``)
rather than on ``model.named_parameters()``; the names it reports are PEFT's
(``<module_path>.lora_E.<adapter>``), so ``config.rank_pattern`` is what PEFT stores and saves.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fxpeft.configs import DEFAULT_LORA_TARGETS, LoraConfig, PeftConfigBase, check_bias, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method

Triplet = tuple[Tensor, Tensor, Tensor]  # (A, E, B) of one site
Sites = Mapping[str, Triplet]  # module path -> its triplet

RANKNUM_EPS = 1e-5  # PEFT adds this to ranknum in the forward and in get_delta_weight


# --------------------------------------------------------------------------- config


@dataclass
class AdaLoraConfig(PeftConfigBase):
    """PEFT's ``AdaLoraConfig``: LoRA's fields plus the rank-allocation schedule.

    Three phases: steps ``<= tinit`` keep the full budget (``init_r`` per site); the budget then
    falls cubically to ``target_r`` per site until step ``total_step - tfinal``, masking every
    ``deltaT`` steps; afterwards the final pattern is kept. ``rank_pattern`` is filled during
    training (``{"<path>.lora_E.<adapter>": [keep, ...]}``; saved without ``.<adapter>``) and
    tells a loader how to shrink each site. ``r``, ``use_rslora`` and ``alpha_pattern`` exist only
    so PEFT's adapter_config.json round-trips: AdaLoRA ignores them, as PEFT does.
    """

    target_r: int = 8
    init_r: int = 12
    tinit: int = 0
    tfinal: int = 0
    deltaT: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: Optional[int] = None
    rank_pattern: Optional[dict] = None

    r: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: Optional[list[str]] = None
    init_lora_weights: Union[bool, str] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    peft_type = "ADALORA"
    # PEFT saves every LoRA field with it: refused as LoRA refuses them, or without effect
    UNSUPPORTED = (*LoraConfig.UNSUPPORTED, "lora_bias", "loftq_config")
    IGNORED = (*LoraConfig.IGNORED, "megatron_core", "qalora_group_size")

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks (same conditions, same meaning)
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA.")
        check_layer_fields(self)
        if self.r != 8:
            warnings.warn("Note that `r` is not used in AdaLora and will be ignored. "
                          "If you intended to set the initial rank, use `init_r` instead.", stacklevel=3)
        if self.total_step is None or self.total_step <= 0:
            raise ValueError("AdaLoRA does not work when `total_step` is None, supply a value > 0.")
        if self.orth_reg_weight < 0:
            raise ValueError(
                f"`orth_reg_weight` should be greater than or equal to 0, but the value passed is {self.orth_reg_weight}")
        if self.tinit >= (self.total_step - self.tfinal):
            raise ValueError("The supplied schedule values don't allow for a budgeting phase. "
                             "Decrease `tfinal`/`tinit` or increase `total_step`.")
        # fxpeft's: values PEFT accepts here but fails on later (update_layer, the step modulo)
        if not isinstance(self.init_r, int) or isinstance(self.init_r, bool) or self.init_r < 0:
            raise ValueError(f"AdaLoraConfig.init_r must be an integer >= 0, got {self.init_r!r}.")
        if not isinstance(self.deltaT, int) or isinstance(self.deltaT, bool) or self.deltaT <= 0:
            raise ValueError(f"AdaLoraConfig.deltaT must be a positive integer, got {self.deltaT!r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"AdaLoraConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}.")
        check_bias(self, "lora_only")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"AdaLoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}.")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError(f"AdaLoraConfig.rank_pattern must be a dict or None, got {self.rank_pattern!r}.")
            self.rank_pattern = {name: _keep_list(name, keep) for name, keep in self.rank_pattern.items()}

    def to_dict(self) -> dict[str, Any]:
        """As PEFT saves it: ``rank_pattern`` keyed ``<path>.lora_E`` (the adapter name dropped)."""
        out = super().to_dict()
        if self.rank_pattern:
            out["rank_pattern"] = {(k.rsplit(".", 1)[0] if k.split(".")[-2:-1] == ["lora_E"] else k): v
                                   for k, v in self.rank_pattern.items()}
        return out


def _keep_list(name: str, keep) -> list[bool]:
    if isinstance(keep, Tensor):
        keep = keep.view(-1).tolist()
    if not isinstance(keep, (list, tuple)) or not all(isinstance(k, (bool, int)) for k in keep):
        raise ValueError(f"AdaLoraConfig.rank_pattern[{name!r}] must be a list of booleans, got {keep!r}.")
    return [bool(k) for k in keep]


# --------------------------------------------------------------------------- layer math


def adalora_scaling(lora_alpha: float, r: int) -> float:
    """PEFT's ``scaling``: ``lora_alpha``, not divided by the rank (ranknum divides in the forward)."""
    return lora_alpha if lora_alpha > 0 else float(r)


def adalora_delta(x: Tensor, A: Tensor, E: Tensor, B: Tensor, scaling: float, ranknum: Union[Tensor, float],
                  dropout: Optional[Callable[[Tensor], Tensor]] = None) -> Tensor:
    """What PEFT's ``SVDLinear.forward`` adds (in place) to the base output, same op order.

    ``x`` is cast to ``A``'s dtype first; the caller adds the result to the base output in the
    base output's dtype (PEFT's ``result += delta``)."""
    ranknum = ranknum + RANKNUM_EPS
    if x.dtype != A.dtype:
        x = x.to(dtype=A.dtype)
    if dropout is not None:
        x = dropout(x)
    return (x @ (A * E).T @ B.T) * scaling / ranknum


def adalora_delta_weight(A: Tensor, E: Tensor, B: Tensor, scaling: float, ranknum: Union[Tensor, float],
                         fan_in_fan_out: bool = False) -> Tensor:
    """PEFT's ``SVDLinear.get_delta_weight``: what merging adds to the base weight. For a conv site
    (A: (r, in * kh * kw)) PEFT's ``SVDConv2d`` is this with ``fan_in_fan_out=False``, reshaped to
    the kernel's shape."""
    delta = B @ (A * E)
    if fan_in_fan_out:
        delta = delta.T
    return delta * scaling / (ranknum + RANKNUM_EPS)


def init_adalora_weights(A: Tensor, E: Tensor, B: Tensor, init: Union[bool, str] = True) -> None:
    """PEFT's ``reset_lora_parameters``: E zeros, then A and B normal(0, 0.02), in that order.

    With a false ``init`` PEFT leaves the ``torch.randn`` values the tensors were created with."""
    if not init:
        return
    with torch.no_grad():
        torch.nn.init.zeros_(E)
        torch.nn.init.normal_(A, mean=0.0, std=0.02)
        torch.nn.init.normal_(B, mean=0.0, std=0.02)


def create_adalora_parameters(r: int, in_features: int, out_features: int, init: Union[bool, str] = True, *,
                              device=None, dtype=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(A, E, B, ranknum)`` drawn from the global RNG exactly as PEFT's ``update_layer`` draws them
    (randn A, E, B and a ranknum, then the reset), created in float32 on the CPU and then moved to
    the base layer's ``device``/``dtype``: seeded alike, the values are PEFT's bit for bit.
    ``ranknum`` is ``float(r)``, frozen, and not part of PEFT's checkpoints."""
    if r < 0:
        raise ValueError(f"`r` should be a positive integer or 0, but the value passed is {r}")
    A = torch.randn(r, in_features)
    E = torch.randn(r, 1)
    B = torch.randn(out_features, r)
    ranknum = torch.randn(1).fill_(float(r))
    init_adalora_weights(A, E, B, init)
    cast = dict(device=device, dtype=dtype) if dtype is not None and dtype.is_floating_point else dict(device=device)
    return (torch.nn.Parameter(A.to(**cast)), torch.nn.Parameter(E.to(**cast)), torch.nn.Parameter(B.to(**cast)),
            torch.nn.Parameter(ranknum.to(**cast), requires_grad=False))


# --------------------------------------------------------------------------- orthogonal regulariser


def orth_regularization(pairs: Iterable[tuple[Tensor, Tensor]], orth_reg_weight: float = 1.0) -> Tensor:
    """What PEFT's ``AdaLoraModel.forward`` adds to ``outputs.loss``:
    ``orth_reg_weight * mean over matrices of ||P - I||_F`` (Frobenius norm, not squared), with
    ``P = A @ A.T`` for each A and ``P = B.T @ B`` for each B; A and B count as two matrices.
    Pairs in PEFT's parameter order (module order, A before B) give its sum bit for bit."""
    if orth_reg_weight < 0:
        raise ValueError("orth_reg_weight should be greater than or equal to 0. ")
    regu_loss, num_param = 0, 0
    for A, B in pairs:
        for cov in (A @ A.T, B.T @ B):
            eye = torch.eye(*cov.size(), out=torch.empty_like(cov))
            regu_loss = regu_loss + torch.norm(cov - eye, p="fro")
            num_param += 1
    if num_param == 0:
        return torch.tensor(0.0)
    return orth_reg_weight * (regu_loss / num_param)


# --------------------------------------------------------------------------- rank allocator


class RankAllocator:
    """PEFT's ``RankAllocator`` over an explicit ``{module_path: (A, E, B)}`` mapping.

    Importance of a parameter entry is ``|p * grad|`` smoothed by an EMA (``beta1``) times an EMA of
    its deviation from that (``beta2``); a triplet's score is its E entry plus the mean over A's row
    plus the mean over B's column. ``sites`` fixes the initial budget (sum of the sites' ranks);
    pass it here or on the first call. State is keyed by PEFT's parameter names
    (``<path>.lora_A.<adapter>``...), so it can be compared with PEFT's allocator entry by entry.
    """

    def __init__(self, config: AdaLoraConfig, adapter_name: str = "default", sites: Optional[Sites] = None):
        self.peft_config = config
        self.adapter_name = adapter_name
        self.beta1 = config.beta1
        self.beta2 = config.beta2
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):  # PEFT: assert
            raise ValueError(f"AdaLoRA needs 0 < beta1, beta2 < 1, got beta1={self.beta1}, beta2={self.beta2}.")
        self.init_bgt: Optional[int] = None
        self.target_bgt: Optional[int] = None
        self.reset_ipt()
        if sites is not None:
            self.set_budget(sites)

    # ---- PEFT's naming
    def name(self, path: str, kind: str) -> str:
        """PEFT's parameter name (relative to the adapted model) of ``kind`` in {"lora_A", "lora_E", "lora_B"}."""
        return f"{path}.{kind}.{self.adapter_name}"

    def _named(self, sites: Sites) -> Iterable[tuple[str, str, Tensor]]:
        for path, (A, E, B) in sites.items():
            for kind, p in (("lora_A", A), ("lora_B", B), ("lora_E", E)):
                yield path, kind, p

    # ---- schedule
    def set_total_step(self, total_step: int) -> None:
        self.peft_config.total_step = total_step

    def reset_ipt(self) -> None:
        self.ipt: dict[str, Tensor] = {}
        self.exp_avg_ipt: dict[str, Tensor] = {}
        self.exp_avg_unc: dict[str, Tensor] = {}

    def set_budget(self, sites: Sites) -> None:
        """PEFT's ``_set_budget_scheduler``: the budget starts at the sites' total rank and ends at
        ``target_r`` per site."""
        self.init_bgt = sum(A.size(0) for A, _, _ in sites.values())
        self.target_bgt = self.peft_config.target_r * len(sites)

    def _ensure_budget(self, sites: Optional[Sites]) -> None:
        if self.init_bgt is None:
            if sites is None:
                raise RuntimeError("RankAllocator has no budget yet: pass the sites to the constructor or set_budget.")
            self.set_budget(sites)

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        """``(budget, mask_now)`` at ``step``: full budget up to ``tinit``, cubic decay to the target
        until ``total_step - tfinal`` (masking every ``deltaT`` steps), then the target, masking."""
        self._ensure_budget(None)
        tinit, tfinal, total_step = self.peft_config.tinit, self.peft_config.tfinal, self.peft_config.total_step
        if step <= tinit:
            return self.init_bgt, False
        if step > total_step - tfinal:
            return self.target_bgt, True
        mul_coeff = 1 - (step - tinit) / (total_step - tfinal - tinit)
        budget = int((self.init_bgt - self.target_bgt) * (mul_coeff**3) + self.target_bgt)
        return budget, step % self.peft_config.deltaT == 0

    # ---- importance
    def update_ipt(self, sites: Sites) -> None:
        """Fold this step's ``|p * grad|`` of every A, E, B into the two EMAs."""
        for path, kind, p in self._named(sites):
            n = self.name(path, kind)
            if p.grad is None:
                raise RuntimeError(f"AdaLoRA rank allocation: {n} has no gradient; call it after backward() "
                                   "and before zero_grad(), with every adapted site in the loss.")
            if n not in self.ipt:
                self.ipt[n] = torch.zeros_like(p)
                self.exp_avg_ipt[n] = torch.zeros_like(p)
                self.exp_avg_unc[n] = torch.zeros_like(p)
            with torch.no_grad():
                self.ipt[n] = (p * p.grad).abs().detach()
                self.exp_avg_ipt[n] = self.beta1 * self.exp_avg_ipt[n] + (1 - self.beta1) * self.ipt[n]
                self.exp_avg_unc[n] = (
                    self.beta2 * self.exp_avg_unc[n] + (1 - self.beta2) * (self.ipt[n] - self.exp_avg_ipt[n]).abs())

    def _element_score(self, n: str) -> Tensor:
        return self.exp_avg_ipt[n] * self.exp_avg_unc[n]

    def calculate_score(self, sites: Sites) -> dict[str, Tensor]:
        """Each site's triplet scores, (r, 1), keyed by PEFT's E name."""
        triplet_ipt = {}
        for path in sites:
            ipt_a = torch.mean(self._element_score(self.name(path, "lora_A")), dim=1, keepdim=True)
            ipt_b = torch.mean(self._element_score(self.name(path, "lora_B")), dim=0, keepdim=False).view(-1, 1)
            ipt_e = self._element_score(self.name(path, "lora_E"))
            ipt_ab = torch.cat([ipt_a, ipt_b], dim=1).sum(dim=1, keepdim=False)
            triplet_ipt[self.name(path, "lora_E")] = (ipt_e.view(-1) + ipt_ab.view(-1)).view(-1, 1)
        return triplet_ipt

    def mask_to_budget(self, sites: Sites, budget: int) -> dict[str, list[bool]]:
        """Zero (in place) the E entries of every triplet scoring at or below the
        ``(init_bgt - budget)``-th smallest score; return which entries survive, per site."""
        self._ensure_budget(sites)
        triplet_ipt = self.calculate_score(sites)
        mask_threshold = torch.kthvalue(torch.cat([s.view(-1) for s in triplet_ipt.values()]),
                                        k=self.init_bgt - budget)[0].item()
        rank_pattern = {}
        with torch.no_grad():
            for path, (_, E, _) in sites.items():
                n = self.name(path, "lora_E")
                E.masked_fill_(triplet_ipt[n] <= mask_threshold, 0.0)
                rank_pattern[n] = (~(triplet_ipt[n] <= mask_threshold)).view(-1).tolist()
        return rank_pattern

    def update_and_allocate(self, sites: Sites, global_step: int,
                            force_mask: bool = False) -> tuple[int, Optional[dict[str, list[bool]]]]:
        """PEFT's ``RankAllocator.update_and_allocate``: ``(budget, rank_pattern or None)``."""
        self._ensure_budget(sites)
        if global_step < self.peft_config.total_step - self.peft_config.tfinal:
            self.update_ipt(sites)
        budget, mask_ind = self.budget_schedule(global_step)
        rank_pattern = self.mask_to_budget(sites, budget) if (mask_ind or force_mask) else None
        return budget, rank_pattern

    def mask_using_rank_pattern(self, sites: Sites, rank_pattern: Mapping[str, Any]) -> None:
        """Zero the E entries ``rank_pattern`` drops. Keys with or without the adapter name
        (``<path>.lora_E.<adapter>`` live, ``<path>.lora_E`` once saved), as PEFT accepts (PEFT
        decides by looking for the adapter name in the first key; this looks up each site's key)."""
        with torch.no_grad():
            for path, (_, E, _) in sites.items():
                key = rank_pattern_key(rank_pattern, path, self.adapter_name)
                if key is None:
                    raise KeyError(f"AdaLoRA rank_pattern has no entry for the adapted site {path!r} "
                                   f"({self.name(path, 'lora_E')!r} or {path + '.lora_E'!r}).")
                keep = torch.Tensor(rank_pattern[key]).unsqueeze(-1).to(E.device)
                E.masked_fill_(~keep.bool(), 0.0)

    def step(self, sites: Sites, global_step: int) -> Optional[dict[str, list[bool]]]:
        """PEFT's ``AdaLoraModel.update_and_allocate``: call after ``optimizer.step()`` and before
        ``zero_grad()`` every training step. Updates ``config.rank_pattern`` when it masks (the
        final allocation at ``total_step - tfinal`` also resets the importance state); afterwards
        re-applies the final pattern. Returns the new rank pattern, or None."""
        config = self.peft_config
        final = config.total_step - config.tfinal
        if global_step < final:
            _, rank_pattern = self.update_and_allocate(sites, global_step)
            if rank_pattern:
                config.rank_pattern = rank_pattern
            return rank_pattern
        if global_step == final:
            _, rank_pattern = self.update_and_allocate(sites, global_step, force_mask=True)
            config.rank_pattern = rank_pattern
            self.reset_ipt()
            return rank_pattern
        if not config.rank_pattern:
            raise RuntimeError(f"AdaLoRA step {global_step} is past the final allocation (step {final}) but the config "
                               "has no rank_pattern: the steps before it were not run through this allocator.")
        self.mask_using_rank_pattern(sites, config.rank_pattern)
        return None


# --------------------------------------------------------------------------- loading a rank pattern


def rank_pattern_key(rank_pattern: Mapping[str, Any], path: str, adapter_name: str = "default") -> Optional[str]:
    """The key of ``path``'s entry in a live (``<path>.lora_E.<adapter>``) or saved
    (``<path>.lora_E``) rank pattern, or None."""
    for key in (f"{path}.lora_E.{adapter_name}", f"{path}.lora_E"):
        if key in rank_pattern:
            return key
    return None


def resize_by_rank_pattern(A: Tensor, E: Tensor, B: Tensor, keep) -> Triplet:
    """PEFT's ``resize_state_dict_by_rank_pattern`` for one site: keep the kept rows of A and E and
    columns of B (saving writes these shapes; loading resizes the fresh site to them, keeping its
    ``ranknum`` at ``init_r`` so the scale does not change)."""
    keep = keep.view(-1).tolist() if isinstance(keep, Tensor) else list(keep)
    rank = sum(keep)
    return (A if rank == A.shape[0] else A[keep], E if rank == E.shape[0] else E[keep],
            B if rank == B.shape[1] else B[:, keep])


# --------------------------------------------------------------------------- the method (additive form)
#
# State beside each adapted module, PEFT's names: ``lora_A.<adapter>`` (r, in), ``lora_E.<adapter>``
# (r, 1), ``lora_B.<adapter>`` (out, r) parameters, ``ranknum.<adapter>`` (a frozen parameter PEFT
# does not save), ``lora_dropout.<adapter>``, and the form's gate ``adalora_gate.<adapter>`` (value:
# the scaling). Rank allocation zeroes E entries in place: data the graph reads, so a compiled
# module never recompiles for it.

CONTAINERS = ("lora_A", "lora_E", "lora_B", "ranknum", "lora_dropout")
aten = torch.ops.aten


def _adalora_adapters(module: nn.Module) -> list[str]:
    gates = module._modules.get("adalora_gate")
    return list(gates.keys()) if gates is not None else []


def _site_sizes(module: nn.Module, site, weight) -> tuple[int, int]:
    if site.kind == "conv":
        if not isinstance(module, nn.Conv2d) or module.groups != 1:
            raise ValueError(f"Target module {site.path!r} ({type(module).__name__}) is not supported by AdaLoRA: PEFT "
                             "adapts nn.Linear, Conv1D and (ungrouped) nn.Conv2d. Leave it out of target_modules.")
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels
    out_f, in_f = weight.shape[::-1] if site.fan_in_fan_out else weight.shape
    return in_f, out_f


def add_adalora(module: nn.Module, site, weight, config: AdaLoraConfig, adapter: str) -> None:
    in_f, out_f = _site_sizes(module, site, weight)
    A, E, B, ranknum = create_adalora_parameters(config.init_r, in_f, out_f, config.init_lora_weights,
                                                 device=weight.device, dtype=adapter_dtype(weight))
    key = rank_pattern_key(config.rank_pattern or {}, site.path, adapter)
    if key is not None:  # a saved adapter: its sites at their allocated ranks (ranknum stays init_r, as PEFT)
        A, E, B = (nn.Parameter(t.detach().clone()) for t in resize_by_rank_pattern(A, E, B, config.rank_pattern[key]))
        if A.shape[0] == 0:
            ranknum.data.fill_(0.0)
    for name, value in (("lora_A", A), ("lora_E", E), ("lora_B", B), ("ranknum", ranknum)):
        child_dict(module, name, nn.ParameterDict)[adapter] = value
    child_dict(module, "lora_dropout")[adapter] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 \
        else nn.Identity()
    child_dict(module, "adalora_gate")[adapter] = AdapterGate(adalora_scaling(config.lora_alpha, config.init_r),
                                                              config.lora_dropout).to(weight.device)


def delta(lw, site, module: nn.Module, adapter: str, x, coefficient):
    """PEFT's ``(x @ (A * E).T @ B.T) * scaling / (ranknum + 1e-5)`` (conv: the same product as a
    kernel), scaled in PEFT's order: ``coefficient`` is the scaling while the adapter acts."""
    path = site.path
    a, e, b = (lw.attr(f"{path}.{name}.{adapter}") for name in ("lora_A", "lora_E", "lora_B"))
    ranknum = lw.call(aten.add.Tensor, lw.attr(f"{path}.ranknum.{adapter}"), RANKNUM_EPS)
    ae = lw.call(aten.mul.Tensor, a, e)
    if site.kind == "linear":
        out = lw.call(aten.linear.default, lw.call(aten.linear.default, x, ae), b)
        return lw.call(aten.div.Tensor, lw.call(aten.mul.Tensor, out, coefficient), ranknum)
    kernel = lw.call(aten.div.Tensor, lw.call(aten.mul.Tensor, lw.call(aten.mm.default, b, ae), coefficient), ranknum)
    kernel = lw.call(aten.reshape.default, kernel, list(module.weight.shape))
    return lw.call(conv2d_like, x, kernel, module.stride, module.padding, module.dilation)


def conv2d_like(x, kernel, stride, padding, dilation):
    return F.conv2d(x, kernel, None, stride, padding, dilation)


def delta_factors(gm, site, module: nn.Module, adapter: str) -> Optional[tuple[Tensor, Tensor]]:
    """A linear site's ΔW as (out, in) = B' A': A' = A ⊙ E, B' = B s / (ranknum + ε)."""
    if site.kind != "linear":
        return None
    scale = module.adalora_gate[adapter].scale / (module.ranknum[adapter] + RANKNUM_EPS)
    return module.lora_A[adapter] * module.lora_E[adapter], module.lora_B[adapter] * scale


def delta_weight(gm, site, module: nn.Module, adapter: str) -> Tensor:
    scaling = module.adalora_gate[adapter].scale
    delta = adalora_delta_weight(module.lora_A[adapter], module.lora_E[adapter], module.lora_B[adapter], scaling,
                                 module.ranknum[adapter], site.fan_in_fan_out)
    return delta.reshape(module.weight.shape) if site.kind == "conv" else delta


def trainable_adapter(gm) -> Optional[str]:
    return next((name for name, config in gm.peft_config.items()
                 if isinstance(config, AdaLoraConfig) and not config.inference_mode), None)


def sites_of(gm, adapter: str) -> dict[str, Triplet]:
    """{module path: (A, E, B)} of ``adapter``, in module order (PEFT's parameter order)."""
    return {path: (m.lora_A[adapter], m.lora_E[adapter], m.lora_B[adapter])
            for path, m in gm.named_modules() if adapter in _adalora_adapters(m)}


def attach(gm, sites, config: AdaLoraConfig, adapter: str, site_attach) -> list[str]:
    trained = trainable_adapter(gm)
    if not config.inference_mode and trained is not None:
        raise ValueError(f"AdaLoRA supports only 1 trainable adapter ({trained!r} is one), as in PEFT. When using "
                         "multiple adapters, set inference_mode=True for all adapters except the one you want to train.")
    return site_attach(gm, sites, config, adapter)


def update_and_allocate(gm, global_step: int):
    """PEFT's ``update_and_allocate``: call every training step after ``optimizer.step()`` and before
    ``zero_grad()``. Scores the trainable adapter's triplets, zeroes the least important E entries
    to follow the budget schedule and records ``rank_pattern`` in its config. Returns the new rank
    pattern when it masked, else None."""
    adapter = trainable_adapter(gm)
    if adapter is None:
        raise ValueError("update_and_allocate needs a trainable AdaLoRA adapter (inference_mode=False); this module "
                         f"has {sorted(gm.peft_config) or 'no adapters'}.")
    allocators = gm.__dict__.setdefault("_fxpeft_rank_allocators", {})
    config = gm.peft_config[adapter]
    if adapter not in allocators or allocators[adapter].peft_config is not config:
        allocators[adapter] = RankAllocator(config, adapter)
    return allocators[adapter].step(sites_of(gm, adapter), global_step)


def add_orthogonal_regulariser(gm, adapter: str, loss: Tensor) -> Tensor:
    """PEFT adds ``orth_reg_weight`` times the mean ‖AAᵀ − I‖ / ‖BᵀB − I‖ of the trainable adapter
    to a returned loss, for models with a task type (PEFT's wrapper calls the base model directly
    otherwise)."""
    config = gm.peft_config[adapter]
    if config.inference_mode or config.task_type is None:
        return loss
    pairs = [(a, b) for a, _, b in sites_of(gm, adapter).values()]
    return loss + orth_regularization(pairs, config.orth_reg_weight)


def saved_state(gm, adapter: str, tensors: dict) -> dict:
    """PEFT saves each site cut to its allocated rank (``rank_pattern``): kept rows of A and E,
    kept columns of B."""
    pattern = gm.peft_config[adapter].rank_pattern
    if not pattern:
        return tensors
    prefix = "base_model.model."
    tensors = dict(tensors)
    for path in sites_of(gm, adapter):
        key = rank_pattern_key(pattern, path, adapter)
        names = [f"{prefix}{path}.{kind}" for kind in ("lora_A", "lora_E", "lora_B")]
        if key is None or not all(n in tensors for n in names):
            continue
        resized = resize_by_rank_pattern(*(tensors[n] for n in names), pattern[key])
        tensors.update(zip(names, resized))
    return tensors


_METHOD = additive(
    name="adalora", config_type=AdaLoraConfig, create=add_adalora, delta=delta, delta_weight=delta_weight,
    delta_factors=delta_factors,
    containers=CONTAINERS, gates="adalora_gate", dropouts="lora_dropout", scales_itself=True,
    dtype_of=lambda module, adapter: module.lora_A[adapter].dtype, kinds=("linear", "conv"),
    default_targets=DEFAULT_LORA_TARGETS, adapters_at=_adalora_adapters, unsaved_containers=("ranknum",),
    saved_state=saved_state, adjust_loss=add_orthogonal_regulariser,
    module_methods=(("update_and_allocate", update_and_allocate),),
    describe=lambda module, adapter: f"r={int((module.lora_E[adapter] != 0).sum())}/{module.lora_E[adapter].shape[0]}")
METHOD = register_method(dataclasses.replace(_METHOD, attach=functools.partial(attach, site_attach=_METHOD.attach),
                                             mixable="adds"))
