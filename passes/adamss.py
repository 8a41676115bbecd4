"""AdaMSS (adaptive multi-subspaces), PEFT's tuners/adamss, on the additive form:

    Δ(x) = scatter_rows(concat_k B_k A_k V [x; 1])          ΔW, Δb = scatter_rows(concat_k B_k A_k V)

on ``torch.nn.Linear`` sites (quantized ones through their dequantized weight; PEFT refuses Conv1D).
V (r, in + 1) holds the top right singular vectors of [W | b] (``torch.svd_lowrank`` seeded with
``random_seed``, as PEFT); the output rows are clustered by their left singular vectors (scikit-learn's
KMeans with PEFT's settings: scikit-learn is needed, as in PEFT) into ``num_subspaces`` groups, and
subspace k maps the r projected features to its rows through A_k (rank, r: an orthonormal start from
the subspace's Gram matrix) and B_k (rows, rank: zero with ``init_weights="orthogonal"``, else
N(0, 0.01²)). Ranks are ``subspace_rank`` (capped by the rows) or, with ``use_dynamic_rank``, the
singular values above ``svd_threshold`` of the largest. A layer with a bias gets [x; 1], so merging
changes its bias too. State, PEFT's names: ``<path>.adamss_A.<adapter>.<k>``,
``<path>.adamss_B.<adapter>.<k>`` (trained), ``<path>.adamss_newB.<adapter>`` (V, saved, frozen);
``<path>.adamss_gate.<adapter>`` is the form's gate, holding the rows' order (not saved: the
clustering is computed again when a checkpoint is loaded, as PEFT does).

ASA (``use_asa``, PEFT's adaptive subspace allocation) prunes subspaces in training by switching their
parameters' ``requires_grad`` off: ``gm.update_and_allocate(global_step)`` after each backward, as
PEFT's ``AdamssModel.update_and_allocate``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, site_weight
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import SharedTensors, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads

from .beft import nn_linear_only
from .fourierft import FourierGate
from .hira import float_weight
from .vera import out_in

# PEFT's TRANSFORMERS_MODELS_TO_ADAMSS_TARGET_MODULES_MAPPING (the models fxpeft is tested on and their kin)
DEFAULT_ADAMSS_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"], "falcon": ["query_key_value"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"], "vit": ["query", "value"],
}
CONTAINERS = ("adamss_A", "adamss_B", "adamss_newB")


@dataclass
class AdamssConfig(PeftConfigBase):
    """PEFT's AdamssConfig, its fields and defaults: ``r`` (100), ``num_subspaces`` (5), ``subspace_rank``
    (1), ``init_weights`` ("orthogonal" or None; False reads as None), ``use_asa`` and its schedule
    (``asa_target_subspaces``, ``init_warmup``, ``final_warmup``, ``mask_interval``,
    ``asa_importance_beta``, ``asa_uncertainty_beta``, ``asa_schedule_exponent``), ``use_dynamic_rank``,
    ``svd_threshold``, ``random_seed`` and the targeting fields (no ``exclude_modules``)."""

    r: int = 100
    num_subspaces: int = 5
    subspace_rank: int = 1
    target_modules: Optional[Union[list[str], str]] = None
    init_weights: Optional[Literal["orthogonal"]] = "orthogonal"
    modules_to_save: Optional[list[str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    use_asa: bool = False
    asa_target_subspaces: int = 50
    init_warmup: int = 50
    final_warmup: int = 1000
    mask_interval: int = 100
    asa_importance_beta: float = 0.85
    asa_uncertainty_beta: float = 0.85
    asa_schedule_exponent: float = 3.0
    use_dynamic_rank: bool = False
    svd_threshold: float = 0.1
    random_seed: int = 0

    peft_type = "ADAMSS"

    def __post_init__(self):
        super().__post_init__()
        # PEFT's checks, PEFT's words
        if self.init_weights is False:
            self.init_weights = None
        if self.init_weights not in ["orthogonal", None]:
            raise ValueError(f"init_weights must be 'orthogonal' or None, got {self.init_weights}")
        if self.use_asa:
            if self.mask_interval <= 0:
                raise ValueError(f"`mask_interval` must be a positive integer when `use_asa=True`, got "
                                 f"{self.mask_interval}.")
            if self.init_warmup >= self.final_warmup:
                raise ValueError("`init_warmup` must be smaller than `final_warmup` when `use_asa=True` so that ASA "
                                 f"has a non-empty pruning ramp, got init_warmup={self.init_warmup} and "
                                 f"final_warmup={self.final_warmup}.")
            if self.asa_target_subspaces <= 0:
                raise ValueError("`asa_target_subspaces` must be a positive integer when `use_asa=True`, got "
                                 f"{self.asa_target_subspaces}.")
            if self.asa_schedule_exponent <= 0:
                raise ValueError("`asa_schedule_exponent` must be a positive number when `use_asa=True`, got "
                                 f"{self.asa_schedule_exponent}.")
        # what PEFT refuses only when it builds a layer
        for key in ("r", "num_subspaces", "subspace_rank"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"AdamssConfig.{key} must be a positive integer, got {value!r}.")


def kmeans():
    """scikit-learn's KMeans, which PEFT clusters with (PEFT's AdamssConfig requires it too)."""
    try:
        from sklearn.cluster import KMeans
    except ImportError:
        raise ImportError("scikit-learn is required for AdaMSS. Please install it with: pip install scikit-learn "
                          "(or fxpeft's extra: pip install 'fxpeft[adamss]')") from None
    return KMeans


def _svd_seeded(matrix: torch.Tensor, q: int, seed: int):
    """PEFT's ``slice_pca``: ``torch.svd_lowrank`` with the global RNG seeded, restored afterwards."""
    device = matrix.device
    fork = {"devices": []} if device.type == "cpu" else {"devices": [device], "device_type": device.type}
    with torch.random.fork_rng(**fork):
        torch.manual_seed(seed)
        u, _, v = torch.svd_lowrank(matrix, q=q, niter=2, M=None)
    return u[:, :q], v[:, :q].T


def add_adamss(module: nn.Module, site: Site, spec, config: AdamssConfig, adapter: str) -> None:
    """PEFT's ``update_layer``: V and the clusters from [W | b], then per subspace A (and B), their draws in
    PEFT's order."""
    weight = float_weight(module, site.weight.rpartition(".")[2]).detach()
    bias = getattr(module, "bias", None)
    if bias is not None:
        weight = torch.cat((weight, bias.detach().to(weight.dtype).unsqueeze(1)), dim=1)
    weight = weight.to(torch.float32)
    r = min(config.r, *weight.shape)
    uu, vvt = _svd_seeded(weight, r, config.random_seed)
    count = min(config.num_subspaces, uu.shape[0])
    labels = kmeans()(n_clusters=count, init="random", n_init=1, max_iter=10, random_state=123456789).fit_predict(
        uu.detach().cpu().numpy().astype("float32"))
    labels = torch.from_numpy(labels).long()
    segments = [torch.where(labels == k)[0] for k in range(int(labels.max()) + 1)]
    dtype, device = adapter_dtype(spec), spec.device
    a_params, b_params = [], []
    for k in range(count):
        data = uu[segments[k], :config.r]
        if config.use_dynamic_rank:
            gram = data @ data.T
            singular = torch.svd_lowrank(gram, q=min(gram.shape), niter=2)[1]
            rank = min(int((singular > config.svd_threshold * singular[0]).sum().item()), config.subspace_rank,
                       len(singular)) or 1
        else:
            rank = min(len(segments[k]), config.subspace_rank) or 1
        gram = data @ data.T
        start = torch.svd_lowrank(gram, q=min(gram.shape[0], rank), niter=2)[0][:, :rank]
        q = torch.linalg.qr(data.T @ start, mode="reduced")[0]
        # drawn and rounded in the base weight's dtype, then kept in the adapter's (PEFT's autocast), as PEFT does
        b = torch.zeros(len(segments[k]), rank, dtype=spec.dtype) if config.init_weights == "orthogonal" \
            else torch.randn(len(segments[k]), rank, dtype=spec.dtype) * 0.01
        a_params.append(nn.Parameter(q.T.contiguous().to(device, spec.dtype).to(dtype)))
        b_params.append(nn.Parameter(b.to(device, dtype)))
    child_dict(module, "adamss_A")[adapter] = nn.ParameterList(a_params)
    child_dict(module, "adamss_B")[adapter] = nn.ParameterList(b_params)
    if "adamss_newB" not in module._modules:
        module.add_module("adamss_newB", SharedTensors(persistent=True))
    module._modules["adamss_newB"][adapter] = vvt.detach().to(device, spec.dtype).to(dtype)
    rows = torch.cat([segments[k] for k in range(count)]).long()
    child_dict(module, "adamss_gate")[adapter] = FourierGate(1.0, rows).to(device)


def adamss_delta(x, new_b, rows, out_f: int, factors: list):
    """PEFT's forward: [x; 1] (layers with a bias) projected by V, each subspace's B_k A_k, the results
    placed at their rows."""
    if new_b.shape[1] == x.shape[-1] + 1:
        x = torch.cat((x, torch.ones(*x.shape[:-1], 1, device=x.device, dtype=x.dtype)), dim=-1)
    projected = F.linear(x, new_b)
    chunks = [F.linear(F.linear(projected, a), b) for a, b in zip(factors[0::2], factors[1::2])]
    delta = torch.cat(chunks, dim=-1)
    index = rows.expand(*delta.shape[:-1], -1)
    return torch.zeros(*delta.shape[:-1], out_f, device=delta.device, dtype=delta.dtype).scatter(-1, index, delta)


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    factors = []
    for k in range(len(module.adamss_A[adapter])):
        factors += [lw.attr(f"{site.path}.adamss_A.{adapter}.{k}"), lw.attr(f"{site.path}.adamss_B.{adapter}.{k}")]
    return lw.call(adamss_delta, x, lw.attr(f"{site.path}.adamss_newB.{adapter}"),
                   lw.attr(f"{site.path}.adamss_gate.{adapter}.indices"), out_in(site, site_weight(lw.root, site))[0],
                   factors)


def full_delta(module: nn.Module, adapter: str) -> torch.Tensor:
    """PEFT's ``get_delta_weight`` before it splits off the bias column: (out, in [+ 1])."""
    new_b = module.adamss_newB[adapter]
    chunks = [b @ a @ new_b for a, b in zip(module.adamss_A[adapter], module.adamss_B[adapter])]
    rows = module.adamss_gate[adapter].indices
    full = torch.zeros(len(rows), new_b.shape[1], device=new_b.device, dtype=new_b.dtype)
    full[rows] = torch.cat(chunks, dim=0)
    return full.detach() * module.adamss_gate[adapter].scale


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    full = full_delta(module, adapter)
    return full[:, :-1] if getattr(module, "bias", None) is not None else full


def delta_bias(gm, site: Site, module: nn.Module, adapter: str) -> Optional[torch.Tensor]:
    return full_delta(module, adapter)[:, -1] if getattr(module, "bias", None) is not None else None


# ----------------------------------------------------------------------------- ASA


def _asa_sites(gm, adapter: str) -> list[nn.Module]:
    """The modules holding the adapter, in module order (PEFT's ``asa_layers``)."""
    return [m for m in gm.modules() if "adamss_A" in m._modules and adapter in m._modules["adamss_A"]]


def _asa_state(module: nn.Module, adapter: str) -> dict:
    """A site's importance statistics for the adapter (PEFT's ``exp_avg_ipt_A`` …), kept on its gate."""
    gate = module.adamss_gate[adapter]
    if getattr(gate, "asa", None) is None:
        gate.asa = {}
    count = len(module.adamss_A[adapter])
    for key in ("ipt_A", "ipt_B", "unc_A", "unc_B"):
        gate.asa.setdefault(key, [None] * count)
    return gate.asa


def _update_importance(module: nn.Module, adapter: str, config: AdamssConfig) -> None:
    """PEFT's ``update_importance``: EMAs of |p · ∇p| and of its change, per subspace parameter."""
    state = _asa_state(module, adapter)
    for k in range(len(module.adamss_A[adapter])):
        for side in ("A", "B"):
            param = module._modules[f"adamss_{side}"][adapter][k]
            if param.grad is None:
                continue
            ipt, unc = state[f"ipt_{side}"], state[f"unc_{side}"]
            if ipt[k] is None:
                ipt[k], unc[k] = torch.zeros_like(param).detach(), torch.zeros_like(param).detach()
            now = (param * param.grad).abs().detach()
            unc[k].mul_(config.asa_uncertainty_beta).add_((now - ipt[k]).abs(), alpha=1 - config.asa_uncertainty_beta)
            ipt[k].mul_(config.asa_importance_beta).add_(now, alpha=1 - config.asa_importance_beta)


def _target(step: int, config: AdamssConfig, total: int) -> Optional[int]:
    """PEFT's ``_schedule_threshold``: the subspaces to keep, from all of them down to the target."""
    if total == 0 or step < config.init_warmup:
        return None
    if step > config.final_warmup:
        return config.asa_target_subspaces
    left = 1.0 - (step - config.init_warmup) / (config.final_warmup - config.init_warmup)
    left = max(0.0, min(1.0, left))
    span = total - config.asa_target_subspaces
    return int(config.asa_target_subspaces + span * left ** config.asa_schedule_exponent)


def _mask_to_target(target: int, adapter: str, sites: list[nn.Module]) -> None:
    """PEFT's ``_global_mask_to_target``: the ``target`` best-scored subspaces over all sites keep training;
    the others stop (``requires_grad`` off, gradient dropped)."""
    scores = []
    for module in sites:
        state = _asa_state(module, adapter)
        for k in range(len(module.adamss_A[adapter])):
            if state["ipt_A"][k] is None or state["ipt_B"][k] is None:
                continue
            score = (state["ipt_A"][k] * state["unc_A"][k]).mean() + (state["ipt_B"][k] * state["unc_B"][k]).mean()
            scores.append((module, k, score))
    if not scores:
        return
    values = torch.stack([score for _, _, score in scores])
    threshold = float("-inf") if target >= len(scores) else -torch.kthvalue(-values, target)[0].item()
    for module, k, score in scores:
        active = float(score) > threshold
        for side in ("adamss_A", "adamss_B"):
            param = module._modules[side][adapter][k]
            param.requires_grad = active
            if not active:
                param.grad = None


def update_and_allocate(gm, global_step: int) -> None:
    """PEFT's ``AdamssModel.update_and_allocate`` (ASA): call every training step after ``loss.backward()``
    and before ``optimizer.zero_grad()``. Within the warm-up window it accumulates importance; every
    ``mask_interval`` steps it keeps the scheduled number of subspaces training, over all sites."""
    for adapter in list(gm._fxpeft_active):
        config = gm.peft_config[adapter]
        if not isinstance(config, AdamssConfig) or not config.use_asa:
            continue
        sites = _asa_sites(gm, adapter)
        if not sites:
            continue
        within = config.init_warmup <= global_step <= config.final_warmup
        if within:
            for module in sites:
                _update_importance(module, adapter, config)
        if within and global_step % config.mask_interval == 0:
            target = _target(global_step, config, sum(len(m.adamss_A[adapter]) for m in sites))
            if target is not None:
                _mask_to_target(target, adapter, sites)
            for module in sites:
                module.adamss_gate[adapter].asa = None


METHOD = register_method(additive(
    name="adamss", config_type=AdamssConfig, create=add_adamss, delta=delta, delta_weight=delta_weight,
    delta_bias=delta_bias, containers=CONTAINERS, gates="adamss_gate", kinds=("linear",),
    check_site=nn_linear_only("AdaMSS"), dtype_of=lambda module, adapter: module.adamss_newB[adapter].dtype,
    default_targets=DEFAULT_ADAMSS_TARGETS, heads=output_heads,
    module_methods=(("update_and_allocate", update_and_allocate),),
    describe=lambda module, adapter: f"{len(module.adamss_A[adapter])} subspaces"))
