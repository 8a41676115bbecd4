"""LoKr (low-rank Kronecker product), PEFT's tuners/lokr, on the additive form:

    ΔW = s · W1 ⊗ W2, reshaped to the site's weight

with out = a·b and in = c·d factored by PEFT's ``factorization`` (near the square root, or
``decompose_factor``); ``W1`` (a, c) is a full matrix or, with ``decompose_both`` and a small enough
``r``, ``W1a W1b``; ``W2`` (b, d[, kernel]) is a full matrix when ``r ≥ max(b, d) / 2``, else
``W2a W2b`` (d times the kernel for convolutions) or, with ``use_effective_conv2d`` on a kernel
larger than 1, ``T2 ×₀ W2a ×₁ W2b``. ``s = alpha / r``; added as ``F.linear(x, ΔW)`` or the site's
convolution with ``ΔW``; rank and module dropout in training (passes/lycoris.py). State, PEFT's
names: ``<path>.lokr_w1.<adapter>`` … ``lokr_t2``; ``<path>.lokr_gate.<adapter>`` is the form's gate.
Init as PEFT: ``init_weights=True`` zeroes W1 (or W1a), False draws every factor, "lycoris" zeroes
W2 (or W2b).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

import torch

from fxpeft.registry import register_method

from .lycoris import LycorisConfig, effective_conv, kaiming, lycoris

CONTAINERS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class LoKrConfig(LycorisConfig):
    """PEFT's LoKrConfig: LoHa's fields plus ``decompose_both``, ``decompose_factor`` and
    ``rank_dropout_scale``; ``init_weights`` may also be "lycoris"."""

    decompose_both: bool = False
    decompose_factor: int = -1
    rank_dropout_scale: bool = False
    init_weights: Union[bool, Literal["lycoris"]] = True

    peft_type = "LOKR"
    INIT_WEIGHTS = (True, False, "lycoris")

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.decompose_factor, int) or isinstance(self.decompose_factor, bool):
            raise ValueError(f"LoKrConfig.decompose_factor must be an integer (-1: near the square root), "
                             f"got {self.decompose_factor!r}.")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """PEFT's ``factorization``: ``(m, n)``, ``m ≤ n``, ``m · n = dimension``; ``m = factor`` when it
    divides, else the divisor pair nearest the square root whose smaller part stays ≤ ``factor``."""
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n  # fixed, as in PEFT
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def factors(site, weight, config: LoKrConfig, r: int) -> dict:
    """PEFT's ``update_layer``: the factor shapes, which factors are decomposed, and the init draws in
    PEFT's order."""
    out_f, in_f, *kernel = weight.shape
    (a, b), (c, d) = factorization(out_f, config.decompose_factor), factorization(in_f, config.decompose_factor)
    full_w1 = not (config.decompose_both and r < max(a, c) / 2)
    full_w2 = r >= max(b, d) / 2
    made = {"lokr_w1": torch.empty(a, c)} if full_w1 else {"lokr_w1_a": torch.empty(a, r),
                                                          "lokr_w1_b": torch.empty(r, c)}
    if full_w2:
        made["lokr_w2"] = torch.empty(b, d, *kernel)
    elif effective_conv(site, weight, config):
        made.update(lokr_w2_a=torch.empty(r, b), lokr_w2_b=torch.empty(r, d),
                    lokr_t2=torch.empty(r, r, *kernel, *[1] * (2 - len(kernel))))  # Conv1d: (k, 1), as PEFT
    else:
        made.update(lokr_w2_a=torch.empty(b, r), lokr_w2_b=torch.empty(r, d * torch.Size(kernel).numel()))

    init = config.init_weights
    zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init, ())
    order = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    if init == "lycoris":  # PEFT zeroes W2b before drawing W2a (zeros draw nothing: the order is PEFT's draws)
        order = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_b", "lokr_w2_a", "lokr_t2")
    for name in order:
        if name in made:
            torch.nn.init.zeros_(made[name]) if name in zero else kaiming(made[name])
    return made


def make_weight(w1, w1a, w1b, w2, w2a, w2b, t2, scale, shape):
    """PEFT's ``get_delta_weight`` without dropout: ``make_kron(w1, w2, scale)`` reshaped to the
    site's weight (PEFT's own arrangement, including its Conv1d layouts)."""
    if w1 is None:
        w1 = w1a @ w1b
    if w2 is None:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", t2, w2a, w2b) if t2 is not None else w2a @ w2b
    if w2.dim() == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return (kron(w1, w2) * scale).reshape(shape)


def kron(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.kron(a, b)`` (the fewer dims padded in front, as torch does), the same products, as one
    broadcast multiply: torch.kron views its inputs and fails on a rank-1 effective-conv W2 (size-1
    dims with odd strides; PEFT raises there)."""
    dims = max(a.dim(), b.dim())
    a = a.reshape((1,) * (dims - a.dim()) + tuple(a.shape))
    b = b.reshape((1,) * (dims - b.dim()) + tuple(b.shape))
    spread_a = [n for size in a.shape for n in (size, 1)]
    spread_b = [n for size in b.shape for n in (1, size)]
    out = a.reshape(spread_a) * b.reshape(spread_b)
    return out.reshape([x * y for x, y in zip(a.shape, b.shape)])


METHOD = register_method(lycoris(
    name="lokr", title="LoKr", config_type=LoKrConfig, containers=CONTAINERS, gates="lokr_gate", factors=factors,
    make_weight=make_weight, rank_dropout_scale=lambda config: config.rank_dropout_scale, mixable="adds"))
