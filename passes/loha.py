"""LoHa (low-rank Hadamard product), PEFT's tuners/loha, on the additive form:

    linear (nn.Linear):        ΔW = s · (W1a W1b) ⊙ (W2a W2b)                 W1a, W2a: (out, r); W1b, W2b: (r, in)
    conv (nn.Conv1d/2d):       the same with in = in_channels/groups · kernel, reshaped to the kernel
    conv, use_effective_conv2d (kernel > 1):
                               ΔW = s · T1 ×₀ W1a ×₁ W1b ⊙ T2 ×₀ W2a ×₁ W2b   T: (r, r, *kernel); W·a: (r, out); W·b: (r, in)

with ``s = alpha / r``, added as ``F.linear(x, ΔW)`` or the site's convolution with ``ΔW`` (PEFT
rebuilds ΔW on every call too); rank and module dropout in training (passes/lycoris.py). State,
PEFT's names: ``<path>.hada_w1_a.<adapter>`` … ``hada_t2``; ``<path>.hada_gate.<adapter>`` is the
form's gate (not saved). Init as PEFT: He-uniform factors with ``W2b = 0`` (``init_weights=True``,
so ΔW starts at 0), or all He-uniform (False).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fxpeft.registry import register_method

from .lycoris import LycorisConfig, effective_conv, kaiming, lycoris

CONTAINERS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")


@dataclass
class LoHaConfig(LycorisConfig):
    """PEFT's LoHaConfig: ``r``, ``alpha``, ``rank_dropout``, ``module_dropout``,
    ``use_effective_conv2d``, ``init_weights`` (True or False) and the targeting fields."""

    peft_type = "LOHA"


def factors(site, weight, config: LoHaConfig, r: int) -> dict:
    """PEFT's ``create_adapter_parameters`` then ``reset_adapter_parameters(_random)``: same shapes,
    same draws in the same order."""
    out_f, in_f, *kernel = weight.shape
    if effective_conv(site, weight, config):
        kernel = kernel + [1] * (2 - len(kernel))  # Conv1d: (k, 1), as PEFT
        made = {"hada_w1_a": torch.empty(r, out_f), "hada_w1_b": torch.empty(r, in_f),
                "hada_w2_a": torch.empty(r, out_f), "hada_w2_b": torch.empty(r, in_f),
                "hada_t1": torch.empty(r, r, *kernel), "hada_t2": torch.empty(r, r, *kernel)}
    else:
        flat = in_f * (torch.Size(kernel).numel())
        made = {"hada_w1_a": torch.empty(out_f, r), "hada_w1_b": torch.empty(r, flat),
                "hada_w2_a": torch.empty(out_f, r), "hada_w2_b": torch.empty(r, flat)}
    for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a"):
        kaiming(made[name])
    if config.init_weights:
        torch.nn.init.zeros_(made["hada_w2_b"])  # one zero factor: ΔW starts at 0
    else:
        kaiming(made["hada_w2_b"])
    for name in ("hada_t1", "hada_t2"):
        if name in made:
            kaiming(made[name])
    return made


def make_weight(w1a, w1b, w2a, w2b, t1, t2, scale, shape):
    """PEFT's ``HadaWeight`` / ``HadaWeightCP`` forward (same products, same order), reshaped to the
    site's weight."""
    if t1 is None:
        weight = ((w1a @ w1b) * (w2a @ w2b)) * scale
    else:
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        weight = rebuild1 * rebuild2 * scale
    return weight.reshape(shape)


METHOD = register_method(lycoris(
    name="loha", title="LoHa", config_type=LoHaConfig, containers=CONTAINERS, gates="hada_gate", factors=factors,
    make_weight=make_weight, rank_dropout_scale=lambda config: True, mixable="adds"))
