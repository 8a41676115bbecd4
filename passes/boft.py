"""BOFT (PEFT's tuners/boft): OFT whose orthogonal matrix is a product of butterfly factors, plus
a learned per-output scale, on the weight-map form through passes/orthogonal.py:

    B = M_{m-1} ⋯ M_0,   M_i = P_i diag(Cayley(R_i1) … Cayley(R_iD)) P_i^T
    Cayley(R) = (I - S)(I + S)^-1,  S = (R - R^T)/2 (exact, ``torch.linalg.solve``)

    nn.Linear (and quantized linears):  y = s ⊙ (W (x B)) + b      merged: W ← s ⊙ (W B^T)
    nn.Conv2d:                          W ← s ⊙ (W B^T) over the flattened filter (C·k·k)

``boft_R.<adapter>`` (m, D, b, b), ``boft_s.<adapter>`` (out, 1) for linear, (1, out) for conv
(PEFT's names and shapes); m = ``boft_n_butterfly_factor``; D·b = the features (exactly one of
``boft_block_size`` / ``boft_block_num`` set); P_i PEFT's block-butterfly permutations (applied
as index permutations, not matrices). ``boft_dropout``: in training, one random factor gets a
random ``int(p·D)`` of its blocks replaced by I (PEFT's MultiplicativeDropoutLayer, same draws).

PEFT 0.21.2 computes m > 1 only with its CUDA extension (fbd_cuda); without it, it warns and
uses m = 1 whatever the config says. fxpeft computes the butterfly the config asks for on any
device (PEFT's CUDA path; tests/test_orthogonal.py checks it against PEFT with that kernel's
block-diagonal supplied in PyTorch), and equals PEFT's fallback for m = 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.configs import DEFAULT_LORA_TARGETS, PeftConfigBase, check_bias
from fxpeft.forms import AdapterGate, adapter_dtype, child_dict, weight_map
from fxpeft.kept import toward_identity
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from . import orthogonal


@dataclass
class BOFTConfig(PeftConfigBase):
    """PEFT's BOFTConfig: its field names, defaults and validation."""

    boft_block_size: int = 4
    boft_block_num: int = 0
    boft_n_butterfly_factor: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    boft_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None

    peft_type = "BOFT"

    def __post_init__(self):
        super().__post_init__()
        orthogonal.check_one_of(self, "boft_block_size", "boft_block_num")
        if not isinstance(self.boft_n_butterfly_factor, int) or self.boft_n_butterfly_factor < 1:
            raise ValueError(f"You can only specify boft_n_butterfly_factor {self.boft_n_butterfly_factor} to be a "
                             "positive integer number.")
        if not 0.0 <= float(self.boft_dropout) < 1.0:
            raise ValueError(f"BOFTConfig.boft_dropout must be in [0, 1), got {self.boft_dropout!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"BOFTConfig.init_weights must be True or False, got {self.init_weights!r} (PEFT raises "
                             "'Unknown initialization' on every layer).")
        check_bias(self, "boft_only")


def sizes(features: int, config: BOFTConfig, what: str) -> tuple[int, int]:
    """(blocks D, block size b) at a site with ``features`` inputs; PEFT's per-layer errors, naming the site."""
    extra = config.boft_n_butterfly_factor - 1  # PEFT's count: factors beyond the first
    if config.boft_block_size == 0:
        num = config.boft_block_num
        if features % num != 0:
            raise ValueError(f"{what} ({features}) must be divisible by boft_block_num ({num})!")
        if extra and (extra > int(math.log2(num)) or num % (2 ** extra) != 0):
            raise ValueError(f"Invalid combination of boft_n_butterfly_factor ({extra + 1}) and boft_block_num ({num}) "
                             f"for {what} ({features}): boft_block_num must be a multiple of 2^{extra}.")
        size = features // num
    else:
        size = config.boft_block_size
        if features % size != 0:
            raise ValueError(f"{what} ({features}) must be divisible by boft_block_size ({size})!")
        if extra and features % (size * 2 ** extra) != 0:
            raise ValueError(f"Invalid combination of {what} ({features}), boft_n_butterfly_factor ({extra + 1}) and "
                             f"boft_block_size ({size}): {what} must be a multiple of {size * 2 ** extra}.")
        num = features // size
    if extra and (num % 2 or size % 2):
        raise ValueError(f"boft_block_num ({num}) and boft_block_size ({size}) must be even numbers with "
                         f"boft_n_butterfly_factor > 1 ({what}).")
    return num, size


def butterfly_permutation(n: int, blocks: int, half: int, extra: int) -> torch.Tensor:
    """PEFT's ``block_butterfly_perm(n, b, r, n_butterfly_factor)``: the order of the n features."""
    if extra == 0:
        return torch.arange(n)
    if blocks * half * 2 > n:
        raise ValueError("Invalid number of blocks!")
    size = n // blocks
    step = size / half
    pairs = torch.cat((torch.arange(0, step, 2), torch.arange(1, step, 2)))
    order = torch.empty(size, dtype=torch.long)
    for i, pos in enumerate(pairs):
        order[int(i * half):int(i * half + half)] = torch.arange(size)[int(pos * half):int(pos * half + half)]
    indices = torch.arange(n)
    for start in range(0, n, size):
        indices[start:start + size] = indices[start:start + size][order]
    return indices


class FactorDropout(nn.Module):
    """PEFT's BOFT MultiplicativeDropoutLayer: in training, one random factor of (m, D, b, b) gets a
    random ``int(p·D)`` of its blocks replaced by I (the same random draws as PEFT)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return blocks
        factors, count, size, _ = blocks.shape
        chosen = torch.randint(0, factors, (1,))  # PEFT's draw; kept a tensor so compiled graphs need no host read
        full = torch.zeros(factors, count, 1, 1, device=blocks.device)
        full[chosen.to(blocks.device)] = orthogonal.shuffled_mask(count, self.p, blocks.device).view(1, count, 1, 1)
        eye = torch.eye(size, device=blocks.device).repeat(factors, count, 1, 1)
        return (1 - full) * blocks + full * eye

    def extra_repr(self) -> str:
        return f"p={self.p}"


def cayley(data: torch.Tensor) -> torch.Tensor:
    """PEFT's BOFT ``cayley_batch``: orthogonal blocks from the skew part of (k, b, b)."""
    k, b, _ = data.shape
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(b, device=data.device).unsqueeze(0).expand(k, b, b)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(data.dtype)


def butterfly(site_module: nn.Module, adapter: str, dropout: bool = True) -> torch.Tensor:
    """B (features, features), gradients flowing to ``boft_R``; with ``dropout``, the adapter's
    dropout module acts on the Cayley blocks first (training only)."""
    r = site_module.boft_R[adapter]
    factors, count, size, _ = r.shape
    blocks = cayley(r.reshape(factors * count, size, size)).reshape(factors, count, size, size)
    if dropout:
        blocks = site_module.boft_dropout[adapter](blocks)
    perms = site_module.boft_gate[adapter].perm
    out = None
    for i in range(factors):
        diagonal = torch.block_diag(*blocks[i].unbind(0))
        factor = diagonal[perms[i]][:, perms[i]]  # P_i diag P_i^T
        out = factor if out is None else factor @ out
    return out


def boft_rotate(site_module: nn.Module, adapter: str, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``v + g (v B - v)``; in dense graphs (a 0-dim gate) as ``v (I + g (B - I))``."""
    b = butterfly(site_module, adapter).to(v.dtype)
    if gate.dim() == 0:
        return v @ toward_identity(b, gate)
    return orthogonal.blend(v, v @ b, gate)


def boft_matrix(site_module: nn.Module, adapter: str) -> torch.Tensor:
    return butterfly(site_module, adapter)


def merged_matrix(site_module: nn.Module, adapter: str) -> torch.Tensor:
    """B as merging folds it: no dropout (PEFT's get_delta_weight)."""
    return butterfly(site_module, adapter, dropout=False)


def boft_scale(site_module: nn.Module, adapter: str) -> torch.Tensor:
    return site_module.boft_s[adapter].reshape(-1)


def _what(site) -> str:
    return "Convolutional kernel dimension" if site.kind == "conv" else f"in_features of {site.path!r}"


def check_site(module: nn.Module, site, weight_spec, config: BOFTConfig) -> None:
    orthogonal.check_site_kinds("BOFT", module, site, ("linear", "conv"))
    sizes(orthogonal.input_features(module, site, weight_spec), config, _what(site))


def add_boft(module: nn.Module, site, weight_spec, config: BOFTConfig, adapter: str) -> None:
    features = orthogonal.input_features(module, site, weight_spec)
    count, size = sizes(features, config, _what(site))
    factors = config.boft_n_butterfly_factor
    out_features = weight_spec.shape[0]
    r = torch.zeros(factors, count, size, size)
    s = torch.ones((1, out_features) if site.kind == "conv" else (out_features, 1))
    if not config.init_weights:
        nn.init.normal_(r, mean=0.0, std=0.1)
        nn.init.normal_(s, mean=1.0, std=0.1)
    dtype, device = adapter_dtype(weight_spec), weight_spec.device
    child_dict(module, "boft_R", nn.ParameterDict)[adapter] = nn.Parameter(r.to(device, dtype))
    child_dict(module, "boft_s", nn.ParameterDict)[adapter] = nn.Parameter(s.to(device, dtype))
    child_dict(module, "boft_dropout")[adapter] = FactorDropout(config.boft_dropout) if config.boft_dropout > 0 \
        else nn.Identity()
    gate = AdapterGate(1.0)
    perms = [butterfly_permutation(features, count // 2 ** i, size // 2, factors - 1) for i in range(factors)]
    gate.register_buffer("perm", torch.stack(perms), persistent=False)
    child_dict(module, "boft_gate")[adapter] = gate.to(device)


def _describe(module: nn.Module, adapter: str) -> str:
    factors, count, size, _ = module.boft_R[adapter].shape
    return f"blocks={count}, block_size={size}, butterfly_factors={factors}"


METHOD = register_method(weight_map(
    name="boft", config_type=BOFTConfig, create=add_boft, check_site=check_site,
    lower_site=orthogonal.lowering(gates="boft_gate", rotate=boft_rotate, matrix=boft_matrix, scale=boft_scale),
    fold=orthogonal.folding(gates="boft_gate", matrix=merged_matrix, scale=boft_scale), maps=orthogonal.MAPS,
    site_parts=orthogonal.parts(rotation=lambda module, adapter: merged_matrix(module, adapter).unsqueeze(0),
                                scale=boft_scale),
    containers=("boft_R", "boft_s", "boft_dropout"), gates="boft_gate", kinds=("linear", "conv"),
    kept_kinds=("linear", "conv"),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, describe=_describe))
