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

import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Union

import torch
from torch import Tensor

from fxpeft.configs import PeftConfigBase, _as_list_or_str

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

    def __post_init__(self):
        super().__post_init__()
        self.target_modules = _as_list_or_str(self.target_modules)
        self.exclude_modules = _as_list_or_str(self.exclude_modules)
        self.layers_pattern = _as_list_or_str(self.layers_pattern)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        # PEFT's checks (same conditions, same meaning)
        if self.use_dora:
            raise ValueError("ADALORA does not support DoRA.")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a str.")
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError("`layers_pattern` cannot be used when `target_modules` is a str.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("When `layers_pattern` is specified, `layers_to_transform` must also be specified.")
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
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"AdaLoraConfig.bias must be 'none', 'all' or 'lora_only', got {self.bias!r}.")
        if self.init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"AdaLoraConfig.init_lora_weights must be True, False or 'gaussian', got {self.init_lora_weights!r}.")
        if self.rank_pattern is not None:
            if not isinstance(self.rank_pattern, dict):
                raise ValueError(f"AdaLoraConfig.rank_pattern must be a dict or None, got {self.rank_pattern!r}.")
            self.rank_pattern = {name: _keep_list(name, keep) for name, keep in self.rank_pattern.items()}


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
