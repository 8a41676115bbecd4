"""OFT (PEFT's tuners/oft): a block-diagonal orthogonal matrix turns a site's input features,
on the weight-map form through passes/orthogonal.py:

    R = diag(R_1 … R_r),  R_i = Cayley(S_i) = (I - S_i)(I + S_i)^-1   (or its Neumann series
    I + 2S + 2S² + … + S^(n-1) with ``use_cayley_neumann``), S_i skew-symmetric from the
    b(b-1)/2 trained entries of ``oft_R.<adapter>.weight`` (r, b(b-1)/2)

    nn.Linear (and quantized linears):  y = W (x R) + b      merged: W ← W R^T
    nn.Conv2d:                          W ← W R^T over the flattened filter (C·k·k)
    nn.Embedding:                       e ← e R               merged: W ← W R

``r`` blocks of size ``oft_block_size`` (exactly one of the two set; PEFT adjusts a value that
does not divide the features, with a warning); ``block_share``: one block for all; ``coft``:
the skew entries projected in place onto a ball of radius ``eps/√r`` before every use (as
PEFT); ``module_dropout``: in training, a random ``int(p·r)`` of the r blocks replaced by I.

Where fxpeft differs from PEFT 0.21.2: PEFT's unmerged Conv2d forward rotates unfolded input
patches and folds them back (summing overlaps), which is not the identity at init and not what
its merge computes; fxpeft computes the merged formula (PEFT's merge) unmerged too. PEFT builds
the ``module_dropout`` layer but its forward never calls it; fxpeft applies it in training.
"""
from __future__ import annotations

import warnings
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
class OFTConfig(PeftConfigBase):
    """PEFT's OFTConfig: its field names, defaults and validation."""

    r: int = 0
    oft_block_size: int = 32
    module_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    fan_in_fan_out: bool = False
    bias: str = "none"
    exclude_modules: Optional[Union[list[str], str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    coft: bool = False
    eps: float = 6e-5
    block_share: bool = False
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5

    peft_type = "OFT"

    # the PEFT release whose OFT fxpeft computes: PEFT reads a saved ``peft_version`` below 0.18 as
    # the old Cayley-Neumann series and warns when loading such an adapter
    PEFT_VERSION = "0.21.2"

    def to_dict(self):
        return {**super().to_dict(), "peft_version": self.PEFT_VERSION}

    @classmethod
    def unsupported(cls, data: dict) -> list[str]:
        """A saved config without ``oft_block_size`` is an OFT adapter from PEFT < 0.14, whose weights
        PEFT's current OFT (and fxpeft) cannot use (PEFT refuses it too)."""
        found = super().unsupported(data)
        if "oft_block_size" not in data:
            found.append("an OFT adapter saved by PEFT < 0.14 (no oft_block_size), incompatible with the current OFT: "
                         "retrain it, or load it with PEFT 0.13")
        return found

    def __post_init__(self):
        super().__post_init__()
        orthogonal.check_one_of(self, "r", "oft_block_size")
        if not 0.0 <= float(self.module_dropout) < 1.0:
            raise ValueError(f"OFTConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}.")
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"OFTConfig.init_weights must be True or False, got {self.init_weights!r} (PEFT raises "
                             "'Unknown initialization' on every layer).")
        check_bias(self, "oft_only")
        if self.use_cayley_neumann and self.num_cayley_neumann_terms < 1:
            raise ValueError(f"OFTConfig.num_cayley_neumann_terms must be >= 1, got {self.num_cayley_neumann_terms}.")


def adjust(features: int, value: int) -> int:
    """PEFT's ``adjust_oft_parameters``: the divisor of ``features`` nearest ``value`` (the lower on a tie)."""
    if value >= features:
        return features
    higher = value
    while higher <= features and features % higher != 0:
        higher += 1
    lower = value
    while lower > 1 and features % lower != 0:
        lower -= 1
    return lower if (value - lower) <= (higher - value) else higher


def cayley(skew: torch.Tensor, neumann: bool, terms: int) -> torch.Tensor:
    """Orthogonal blocks from skew-symmetric ones (b, n, n), as PEFT's ``_cayley_batch``."""
    batch, n = skew.shape[0], skew.shape[-1]
    if not neumann:
        eye = torch.eye(n, device=skew.device).unsqueeze(0).expand(batch, n, n)
        return torch.linalg.solve(eye + skew, eye - skew, left=False).to(skew.dtype)
    out = torch.eye(n, device=skew.device, dtype=skew.dtype).repeat(batch, 1, 1)
    if terms > 1:
        out = out + 2.0 * skew
        if terms > 2:
            power = torch.bmm(skew, skew)
            out = out + 2.0 * power
            for _ in range(3, terms - 1):
                power = torch.bmm(power, skew)
                out = out + 2.0 * power
            out = out + torch.bmm(power, skew)
    return out


class OFTRotation(nn.Module):
    """One adapter's blocks at one site: ``weight`` (r or 1 with block_share, b(b-1)/2), PEFT's name."""

    def __init__(self, blocks: int, block_size: int, features: int, config: OFTConfig):
        super().__init__()
        self.block_size, self.features, self.block_share = block_size, features, config.block_share
        self.rank = features // block_size
        self.coft, self.eps = config.coft, config.eps
        self.neumann, self.terms = config.use_cayley_neumann, config.num_cayley_neumann_terms
        self.weight = nn.Parameter(torch.empty(1 if config.block_share else blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def skew(self, vec: torch.Tensor) -> torch.Tensor:
        matrix = vec.new_zeros(vec.shape[0], self.block_size, self.block_size)
        matrix[:, self.rows, self.cols] = vec
        return matrix - matrix.transpose(-2, -1)

    def project(self) -> None:
        """COFT: each block's skew matrix pulled onto the ball of radius eps/√(blocks), in place (as PEFT)."""
        with torch.no_grad():
            skew = self.skew(self.weight)
            eps = self.eps * 1 / torch.sqrt(torch.tensor(skew.shape[0]))
            norm = torch.norm(skew, dim=(1, 2), keepdim=True)
            projected = torch.where(norm <= eps, skew, eps * (skew / norm))
            self.weight.copy_(projected[:, self.rows, self.cols])

    def blocks(self, dropout: Optional[nn.Module] = None) -> torch.Tensor:
        if self.coft:
            self.project()
        blocks = cayley(self.skew(self.weight), self.neumann, self.terms)
        return dropout(blocks) if dropout is not None else blocks

    def kept_blocks(self) -> torch.Tensor:
        """R's blocks (rank, b, b) as eval computes them (a shared block repeated)."""
        blocks = self.blocks()
        return blocks.expand(self.rank, *blocks.shape[1:])

    def rotate(self, v: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """``v R`` over v's last dim, block by block."""
        if self.block_share:
            blocks = blocks.expand(self.rank, -1, -1)
        split = v.reshape(*v.shape[:-1], self.rank, self.block_size)
        return torch.einsum("...rk,rkc->...rc", split, blocks).reshape(v.shape)

    def matrix(self, blocks: torch.Tensor) -> torch.Tensor:
        if self.block_share:
            blocks = blocks.expand(self.rank, -1, -1)
        return torch.block_diag(*blocks.unbind(0))

    def extra_repr(self) -> str:
        return f"r={self.rank}, block_size={self.block_size}" + (" shared" if self.block_share else "") + (
            " coft" if self.coft else "")


class BlockDropout(nn.Module):
    """OFT's multiplicative dropout (PEFT's MultiplicativeDropoutLayer): in training, a random
    ``int(p·r)`` of the r blocks become the identity; one shared block is left alone."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        count, size = blocks.shape[0], blocks.shape[-1]
        if not self.training or self.p <= 0 or count == 1:
            return blocks
        mask = orthogonal.shuffled_mask(count, self.p, blocks.device).view(count, 1, 1).to(blocks.dtype)
        eye = torch.eye(size, device=blocks.device, dtype=blocks.dtype).expand(count, size, size)
        return (1 - mask) * blocks + mask * eye

    def extra_repr(self) -> str:
        return f"p={self.p}"


def _rotation(site_module: nn.Module, adapter: str) -> OFTRotation:
    holder = site_module._modules.get("oft_R")
    if holder is None or adapter not in holder:
        holder = site_module._modules["oft_embedding_R"]
    return holder[adapter]


def oft_rotate(site_module: nn.Module, adapter: str, v: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``v + g (v R - v)``; in dense graphs (a 0-dim gate) as ``v (I + g (R - I))``, block by block."""
    rotation = _rotation(site_module, adapter)
    blocks = rotation.blocks(site_module.oft_dropout[adapter])
    if gate.dim() == 0:
        return rotation.rotate(v.to(blocks.dtype), toward_identity(blocks, gate)).to(v.dtype)
    return orthogonal.blend(v, rotation.rotate(v.to(blocks.dtype), blocks).to(v.dtype), gate)


def oft_matrix(site_module: nn.Module, adapter: str) -> torch.Tensor:
    rotation = _rotation(site_module, adapter)
    return rotation.matrix(rotation.blocks(site_module.oft_dropout[adapter]))


def merged_matrix(site_module: nn.Module, adapter: str) -> torch.Tensor:
    """R as merging folds it: no dropout (PEFT's get_delta_weight)."""
    rotation = _rotation(site_module, adapter)
    return rotation.matrix(rotation.blocks())


def _sizes(features: int, config: OFTConfig, path: str) -> tuple[int, int]:
    """(blocks, block size) at a site with ``features`` inputs, adjusted as PEFT does."""
    if config.r == 0:
        size = config.oft_block_size
        if features % size != 0 or size > features:
            size = adjust(features, size)
            warnings.warn(f"Invalid `oft_block_size` ({config.oft_block_size}) for {path} ({features} features)! "
                          f"Adjusted `oft_block_size` to ({size}).")
        return features // size, size
    r = config.r
    if features % r != 0 or r > features:
        r = adjust(features, r)
        warnings.warn(f"Invalid `r` ({config.r}) for {path} ({features} features)! Adjusted `r` to ({r}).")
    return r, features // r


def check_site(module: nn.Module, site, weight_spec, config: OFTConfig) -> None:
    orthogonal.check_site_kinds("OFT", module, site, ("linear", "conv", "embedding"))
    if site.kind == "conv" and module.dilation[0] > 1:
        raise ValueError(f"Conv2d with dilation > 1 is not supported by OFT ({site.path!r}), as in PEFT.")


def add_oft(module: nn.Module, site, weight_spec, config: OFTConfig, adapter: str) -> None:
    features = orthogonal.input_features(module, site, weight_spec)
    blocks, size = _sizes(features, config, site.path)
    rotation = OFTRotation(blocks, size, features, config)
    if config.init_weights:
        nn.init.zeros_(rotation.weight)
    else:
        nn.init.normal_(rotation.weight, mean=0.0, std=0.1)
    container = "oft_embedding_R" if site.kind == "embedding" else "oft_R"
    child_dict(module, container)[adapter] = rotation.to(weight_spec.device, adapter_dtype(weight_spec))
    child_dict(module, "oft_dropout")[adapter] = BlockDropout(config.module_dropout) if config.module_dropout > 0 \
        else nn.Identity()
    child_dict(module, "oft_gate")[adapter] = AdapterGate(1.0).to(weight_spec.device)


METHOD = register_method(weight_map(
    name="oft", config_type=OFTConfig, create=add_oft, check_site=check_site,
    lower_site=orthogonal.lowering(gates="oft_gate", rotate=oft_rotate, matrix=oft_matrix),
    fold=orthogonal.folding(gates="oft_gate", matrix=merged_matrix), maps=orthogonal.MAPS,
    site_parts=orthogonal.parts(rotation=lambda module, adapter: _rotation(module, adapter).kept_blocks()),
    containers=("oft_R", "oft_embedding_R", "oft_dropout"), gates="oft_gate", kinds=("linear", "conv", "embedding"),
    kept_kinds=("linear", "conv", "embedding"),
    default_targets=DEFAULT_LORA_TARGETS, heads=output_heads, mixable="wraps",
    describe=lambda module, adapter: _rotation(module, adapter).extra_repr()))
