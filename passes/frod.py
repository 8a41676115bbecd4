"""FRoD (full-rank rotation decomposition), PEFT's tuners/frod, on the additive form:

    W' = U (S + diag λ) Vᵀ        Δ(x) = W' dropout(x) − W dropout(x)        merged: W ← W₀ + Σ_a (W'_a − W₀)

on linear sites (nn.Linear, GPT-2's Conv1D, quantized linears through their dequantized weight).
``V`` (in, in) is a basis shared by the targeted layers of one *category* (the module's role, PEFT's
``_category_from_key``: ``self_attn_q_proj`` for every layer's q_proj), computed as PEFT does from those
layers' weights stacked (an SVD when they have fewer rows than columns, else QR and the eigenvectors
of the ridge-regularised mean of the blocks' inverse Gram matrices); ``U diag λ`` is each layer's
``W V⁻ᵀ`` with λ its column norms, so W' starts equal to W. What trains: λ
(``<path>.frod_lambda_l.<adapter>``) and the values of a sparse off-diagonal S
(``<path>.frod_lambda_s_values.<adapter>``) at positions drawn once per category from
``projection_prng_key`` (``sparse_rate`` of the entries). ``U`` is derived (``<path>.frod_U``, not saved,
as in PEFT).

The shared tensors are kept once on the transformed module, grouped by category as PEFT's tuner
keeps them (``frod_V.<category>.<adapter>``, ``frod_s_indices…``, ``frod_s_size…``) and saved under
PEFT's keys ``base_model.frod_V.<category>`` with ``save_projection`` (otherwise computed again from
the base weights when loading). Each adapter computes its own from the weights as they are when it
is added, as PEFT does, with PEFT's checks that every adapter has the same key and save setting.

The graph computes PEFT's activation-side product (``z = x V``, ``(z Sᵀ + z λ) Uᵀ``) minus the base
op, so one or several adapters, dropout and mixed batches all add to the base output. Merging
follows PEFT: each adapter's ΔW is taken against W₀, the weight before the first FRoD adapter at the
site was merged (kept on the gate's stash, in host memory as PEFT keeps it).
``runtime_offload_base_weight`` (PEFT moves base weights to the CPU while unused) and ``progressbar``
are kept as config fields and have no effect here.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

from fxpeft.canonical import Site
from fxpeft.configs import PeftConfigBase, check_bias, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .hira import float_weight

# PEFT's TRANSFORMERS_MODELS_TO_FROD_TARGET_MODULES_MAPPING (the models fxpeft is tested on and their kin)
DEFAULT_FROD_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"], "falcon": ["query_key_value"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "vit": ["query", "value"],
}
SHARED = ("frod_V", "frod_s_indices", "frod_s_size")
CONTAINERS = ("frod_lambda_l", "frod_lambda_s_values", "frod_U", "frod_dropout", *SHARED)


@dataclass
class FrodConfig(PeftConfigBase):
    """PEFT's FrodConfig, its fields and defaults: ``projection_prng_key``, ``save_projection``,
    ``frod_dropout``, ``fan_in_fan_out``, ``bias``, ``init_weights``, ``sparse_rate`` (0.01),
    ``regularization_alpha`` (1e-3), ``progressbar``, ``runtime_offload_base_weight`` and the targeting
    fields (PEFT's FrodConfig has no ``exclude_modules``)."""

    target_modules: Optional[Union[list[str], str]] = None
    projection_prng_key: int = 0
    save_projection: bool = True
    frod_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    modules_to_save: Optional[list[str]] = None
    init_weights: bool = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    sparse_rate: float = 0.01
    regularization_alpha: float = 1e-3
    progressbar: bool = True
    runtime_offload_base_weight: bool = False

    peft_type = "FROD"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        check_layer_fields(self, regex=())
        if self.sparse_rate < 0 or self.sparse_rate > 1:
            raise ValueError(f"`sparse_rate` should be between 0 and 1, got {self.sparse_rate}.")
        # what PEFT refuses only when it builds a layer or marks biases trainable
        check_dropout(self, "frod_dropout")
        check_bias(self, "frod_only")
        if not isinstance(self.projection_prng_key, int) or isinstance(self.projection_prng_key, bool):
            raise ValueError(f"FrodConfig.projection_prng_key seeds a torch.Generator and must be an integer, "
                             f"got {self.projection_prng_key!r}.")


def category(path: str) -> str:
    """PEFT's ``_category_from_key``: the module's role, shared by the blocks' alike layers."""
    parts = path.split(".")
    if len(parts) == 1:
        return parts[0]
    if parts[-2].isdigit():
        return parts[-1]
    name = f"{parts[-2]}_{parts[-1]}"
    if name == "output_dense" and len(parts) >= 3 and parts[-3] == "attention":
        return "attention_output"
    return name


def layer_index(path: str, fallback: int) -> int:
    """PEFT's ``_layer_index_from_key``: the number after ``layers``, else the first number in the path."""
    parts = path.split(".")
    if "layers" in parts:
        try:
            return int(parts[parts.index("layers") + 1])
        except (ValueError, IndexError):
            pass
    return next((int(part) for part in parts if part.isdigit()), fallback)


def projection(matrices: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """PEFT's ``_projection_from_weights``: V (in, in) from the category's (out, in) weights, float32."""
    stacked = torch.cat(matrices, dim=0)
    if stacked.shape[0] < stacked.shape[1]:
        return torch.linalg.svd(stacked, full_matrices=True)[2].T
    q, r = torch.linalg.qr(stacked)
    dim = r.shape[1]
    mean_inverse = torch.zeros(dim, dim, dtype=r.dtype)
    start = 0
    for matrix in matrices:  # the ridge term keeps the inverse stable for correlated layers
        block = q[start: start + matrix.shape[0]]
        start += matrix.shape[0]
        mean_inverse += torch.linalg.inv(block.T @ block + alpha * torch.eye(dim, dtype=r.dtype))
    mean_inverse /= len(matrices)
    return r.T @ torch.linalg.eigh(mean_inverse)[1]


def sparse_positions(size: int, sparse_rate: float, generator: torch.Generator) -> torch.Tensor:
    """PEFT's COO positions of S: ``sparse_rate`` of the off-diagonal entries (at least one when the rate
    is positive), a random permutation's first ones."""
    rows, cols = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pairs = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    off_diagonal = pairs[pairs[:, 0] != pairs[:, 1]]
    count = min(int(size * size * sparse_rate), off_diagonal.shape[0])
    if sparse_rate > 0 and off_diagonal.shape[0] > 0:
        count = max(1, count)
    if not count:
        return torch.empty(2, 0, dtype=torch.long)
    return off_diagonal[torch.randperm(off_diagonal.shape[0], generator=generator)[:count]].t().contiguous()


def out_in_weight(module: nn.Module, site: Site) -> torch.Tensor:
    """The site's float weight as (out, in) (Conv1D stores it transposed; quantized ones dequantized)."""
    weight = float_weight(module, site.weight.rpartition(".")[2])
    return weight.T if site.fan_in_fan_out else weight


def _group(gm, name: str) -> nn.ModuleDict:
    if name not in gm._modules:
        gm.add_module(name, nn.ModuleDict())
    return gm._modules[name]


def prepare(gm, targets, config: FrodConfig, adapter: str) -> None:
    """PEFT's ``_check_new_adapter_config`` and ``_init_frod_projections``: V, S's positions and size for
    each category of the targeted layers, from their weights as they are now, categories in sorted
    order from one generator; then each site's state (:func:`add_site`), which reads its category's V,
    so it is made here rather than in the form's ``create``."""
    for other in gm.peft_config.values():
        if not isinstance(other, FrodConfig) or other is config:
            continue
        if other.projection_prng_key != config.projection_prng_key:
            raise ValueError(f"FRoD projection initialization key must be the same for all adapters. Got "
                             f"config.projection_prng_key={config.projection_prng_key!r} but previous config had "
                             f"{other.projection_prng_key}.")
        if other.save_projection != config.save_projection:
            raise ValueError("FRoD projection weights must be saved for all adapters or none, but got multiple "
                             f"different values: {sorted({other.save_projection, config.save_projection})}")
        if other.runtime_offload_base_weight != config.runtime_offload_base_weight:
            raise ValueError("FRoD runtime base-weight offloading must be enabled for all adapters or none, but got "
                             "multiple different values: "
                             f"{sorted({other.runtime_offload_base_weight, config.runtime_offload_base_weight})}")
    weights: dict = defaultdict(dict)
    for fallback, (module, site, spec) in enumerate(targets):
        weights[layer_index(site.path, fallback)][category(site.path)] = (out_in_weight(module, site), spec)
    generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
    groups = [_group(gm, name) for name in SHARED]
    for name in sorted({c for layer in weights.values() for c in layer}):
        matrices = [layer[name][0].detach().to(torch.float32).cpu() for _, layer in sorted(weights.items())
                    if name in layer]
        v = projection(matrices, config.regularization_alpha)
        example = next(layer[name] for layer in weights.values() if name in layer)
        device = example[0].device
        # the basis in the base weight's dtype, as PEFT keeps and saves it
        values = (v.to(device, example[1].dtype), sparse_positions(v.shape[0], config.sparse_rate, generator),
                  torch.tensor([v.shape[0], v.shape[0]], dtype=torch.long))
        for group, value in zip(groups, values):
            if name not in group:
                group[name] = SharedTensors(config.save_projection)
            group[name][adapter] = value.to(device)
    for module, site, spec in targets:  # the sites' state needs its category's V: made here, in module order
        name = category(site.path)
        add_site(module, site, spec, config, adapter, groups[0][name][adapter], groups[1][name][adapter].shape[1])


def u_and_lambda(v: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``_calculate_frod_u_and_lambda``: W V⁻ᵀ (float64) split into unit columns U and their norms λ."""
    w, v = w.detach().to(torch.float64).cpu(), v.detach().to(torch.float64).cpu()
    try:
        b = torch.linalg.solve(v, w.T).T
    except RuntimeError:
        b = w @ torch.linalg.pinv(v, rtol=1e-6).T
    lam = torch.linalg.norm(b, dim=0)
    u = torch.zeros_like(b)
    nonzero = lam > 1e-12
    u[:, nonzero] = b[:, nonzero] / lam[nonzero]
    return u.float(), lam.float()


def add_site(module: nn.Module, site: Site, spec, config: FrodConfig, adapter: str, v: torch.Tensor,
             count: int) -> None:
    """PEFT's ``update_layer``: U and λ from the layer's weight and its category's V; S's values zero, or
    with ``init_weights=False`` N(0, 0.1) and λ plus N(0, 0.1) noise (drawn in that order, per layer)."""
    u, lam = u_and_lambda(v, out_in_weight(module, site))
    dtype = adapter_dtype(spec)
    # made and drawn in the base weight's dtype, then kept in the adapter's (PEFT's autocast), as PEFT does
    values = torch.zeros(count, dtype=spec.dtype)
    lam = lam.to(spec.dtype)
    if not config.init_weights:
        nn.init.normal_(values, std=0.1)
        lam = lam + torch.randn_like(lam) * 0.1
    child_dict(module, "frod_lambda_s_values", nn.ParameterDict)[adapter] = nn.Parameter(values.to(v.device, dtype))
    child_dict(module, "frod_lambda_l", nn.ParameterDict)[adapter] = nn.Parameter(lam.to(v.device, dtype))
    if "frod_U" not in module._modules:  # derived from W and V: never saved, as in PEFT
        module.add_module("frod_U", SharedTensors(persistent=False))
    module._modules["frod_U"][adapter] = u.to(v.device, dtype)
    child_dict(module, "frod_dropout")[adapter] = nn.Dropout(config.frod_dropout) if config.frod_dropout > 0 \
        else nn.Identity()
    child_dict(module, "frod_gate")[adapter] = AdapterGate(1.0, config.frod_dropout).to(v.device)


def dense_s(indices: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """S (n, n) from its COO positions and values (PEFT coalesces: repeated positions add)."""
    return torch.zeros(n, n, device=values.device, dtype=values.dtype).index_put(
        (indices[0], indices[1]), values, accumulate=True)


def rotation(u, v, indices, values, lam) -> torch.Tensor:
    """W' = U (S + diag λ) Vᵀ, (out, in), S dense from its COO values."""
    return u @ (dense_s(indices, values, v.shape[0]) + torch.diag(lam)) @ v.T


def frod_delta(x, site_module: nn.Module, weight_name: str, fan_in_fan_out: bool, u, v, indices, values, lam):
    """PEFT's forward: ``(z Sᵀ + z λ) Uᵀ`` for ``z = x V``, less the base op on the same input."""
    s = dense_s(indices, values, v.shape[0])
    z = torch.matmul(x, v.to(x.dtype))
    adapted = torch.nn.functional.linear(torch.matmul(z, s.T) + z * lam, u)
    weight = float_weight(site_module, weight_name).to(x.dtype)
    return adapted - torch.nn.functional.linear(x, weight.T if fan_in_fan_out else weight)


def _tensors(site: Site, adapter: str) -> list[str]:
    name = category(site.path)
    return [f"{site.path}.frod_U.{adapter}", f"frod_V.{name}.{adapter}", f"frod_s_indices.{name}.{adapter}",
            f"{site.path}.frod_lambda_s_values.{adapter}", f"{site.path}.frod_lambda_l.{adapter}"]


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    return lw.call(frod_delta, x, lw.attr(site.path), site.weight.rpartition(".")[2], site.fan_in_fan_out,
                   *(lw.attr(path) for path in _tensors(site, adapter)))


def adapted_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """W' in the layout of the site's stored weight."""
    name = category(site.path)
    u = module.frod_U[adapter]
    weight = rotation(u, gm.frod_V[name][adapter].to(u.dtype), gm.frod_s_indices[name][adapter],
                      module.frod_lambda_s_values[adapter].to(u.dtype), module.frod_lambda_l[adapter].to(u.dtype))
    return weight.detach().T if site.fan_in_fan_out else weight.detach()


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """W' − W for the site's weight as it is now (the unmerged adapter's ΔW)."""
    weight = float_weight(module, site.weight.rpartition(".")[2]).detach()
    return adapted_weight(gm, site, module, adapter).to(weight.dtype) - weight


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    """PEFT's merge: ``W + (W' − W₀)``, W₀ the weight before any FRoD adapter at this site was merged —
    passed on, within one fold of several adapters, as an attribute of the weight this returns, kept
    on a merged adapter's gate between folds (in host memory, as PEFT keeps it); unmerging subtracts
    the same difference."""
    gate = module.frod_gate[adapter]
    if sign > 0:
        base = getattr(weight, "_fxpeft_frod_base", None)
        if base is None:
            base = next((g.stash for g in module.frod_gate.values() if g.merged and g.stash is not None), None)
        if base is None:
            base = weight.detach().to("cpu", copy=True)
        gate.stash = base
        merged = weight + (adapted_weight(gm, site, module, adapter).to(weight) - base.to(weight))
        merged._fxpeft_frod_base = base
        return merged, bias
    base = gate.stash if gate.stash is not None else weight  # no stash: a checkpoint merged elsewhere
    gate.stash = None
    return weight - (adapted_weight(gm, site, module, adapter).to(weight) - base.to(weight)), bias


def checkpoint_keys(config: FrodConfig, keys: set) -> set:
    """PEFT's checks when loading (``_remap_adapter_state_dict_for_load``), PEFT's words: projections wanted
    but missing raise; saved but not wanted are ignored (computed from the base weights instead)."""
    saved = {key for key in keys if key.startswith(tuple(f"base_model.{name}." for name in SHARED))}
    if config.save_projection:
        if not saved:
            raise ValueError(
                "Specified to load FRoD projection tensors from state dictionary however they were not present. "
                "If this checkpoint was saved with `save_projection=False`, set `peft_config.save_projection` "
                "to `False` before loading so the projections are regenerated from the base model weights. "
                "Otherwise, re-save the adapter with `save_projection=True` to include these tensors.")
        return set()
    if saved:
        warnings.warn("Specified to not load FRoD projection tensors from state dictionary however they are present. "
                      "Consider using them to ensure checkpoint loading is correct by setting "
                      "`peft_config.save_projection = True`.")
    return saved


METHOD = register_method(dataclasses.replace(additive(
    name="frod", config_type=FrodConfig, create=lambda *args: None, delta=delta, delta_weight=delta_weight,
    containers=CONTAINERS, shared=SHARED, gates="frod_gate", dropouts="frod_dropout", kinds=("linear",),
    dtype_of=lambda module, adapter: module.frod_lambda_l[adapter].dtype, prepare=prepare,
    checkpoint_keys=checkpoint_keys, default_targets=DEFAULT_FROD_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"{module.frod_lambda_s_values[adapter].numel()} sparse entries"),
    fold=fold))
