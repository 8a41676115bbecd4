"""HiRA (Hadamard high-rank adaptation), PEFT's tuners/hira, on the additive form:

    Δ(x) = (W ⊙ (B A)) dropout(x)          merged: W ← W + W₀ ⊙ Σ_a (B_a A_a)

a low-rank product modulating the frozen weight elementwise, so ΔW has W's rank, not r. Sites as
PEFT: nn.Linear and GPT-2's Conv1D (``hira_A`` (r, in), ``hira_B`` (out, r)), quantized linears (the
graph reads the dequantized weight, as PEFT's bitsandbytes layers do), nn.Conv1d/2d/3d (``hira_A``
(r, in, *kernel), ``hira_B`` (out, r, 1, …): B A over the flattened kernel, groups > 1 refused as
PEFT refuses them) and nn.Embedding (``hira_embedding_A`` (r, vocab), ``hira_embedding_B``
(dim, r): the looked-up rows of W ⊙ (B A)ᵀ, no dropout). PEFT's names, shapes and draws (randn A
and B, then with ``init_weights`` A He-uniform — or N(0, 1/r) for "gaussian" on linear sites — and
B zero; embeddings A zero and B N(0, 1)).

Merging follows PEFT: every HiRA adapter at a site modulates W₀, the weight before the first of
them was merged (kept on that adapter's gate ``stash``), so adapters merged together or one after
the other give the unmerged sum; unmerging subtracts W₀ ⊙ B A again. W₀ is held in host memory
while merged, as PEFT holds it.

``rank_pattern`` sets a layer's r for every adapter, as documented; PEFT 0.21.2 builds a layer's
first adapter with ``r`` whatever the pattern says (its ``dispatch_default`` reads ``config.r``) and
honours the pattern only for later adapters on that layer, so a PEFT checkpoint made with a
pattern holds r-sized first adapters (tests/test_hira.py checks both).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import Site, float_weight
from fxpeft.configs import PeftConfigBase, check_dropout, check_layer_fields
from fxpeft.forms import AdapterGate, adapter_dtype, additive, child_dict
from fxpeft.registry import register_method
from fxpeft.targets import output_heads, pattern_value

from .vera import out_in

aten = torch.ops.aten

# PEFT's TRANSFORMERS_MODELS_TO_HIRA_TARGET_MODULES_MAPPING (the models fxpeft is tested on and their kin)
DEFAULT_HIRA_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "bart": ["q_proj", "v_proj"], "gpt2": ["c_attn"],
    "bloom": ["query_key_value"], "opt": ["q_proj", "v_proj"], "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"], "gpt_neo": ["q_proj", "v_proj"], "bert": ["query", "value"],
    "roberta": ["query", "value"], "xlm-roberta": ["query", "value"], "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"], "llama": ["q_proj", "v_proj"], "llama4": ["q_proj", "v_proj"],
    "gpt_bigcode": ["c_attn"], "falcon": ["query_key_value"], "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj", "fc1", "fc2"], "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"], "gemma3_text": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
}
CONTAINERS = ("hira_A", "hira_B", "hira_embedding_A", "hira_embedding_B", "hira_dropout")


@dataclass
class HiraConfig(PeftConfigBase):
    """PEFT's HiraConfig, its fields and defaults: ``r`` (32), ``hira_dropout``, ``fan_in_fan_out``,
    ``init_weights`` (True, False or "gaussian"), ``rank_pattern`` and the targeting fields."""

    r: int = 32
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    hira_dropout: float = 0.0
    fan_in_fan_out: bool = False
    modules_to_save: Optional[list[str]] = None
    init_weights: Union[bool, Literal["gaussian"], None] = True
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: Optional[dict] = field(default_factory=dict)

    peft_type = "HIRA"

    def __post_init__(self):
        super().__post_init__()
        self.rank_pattern = self.rank_pattern or {}
        # PEFT's checks, PEFT's words
        check_layer_fields(self, pattern=False)
        # what PEFT refuses only when it builds a layer (r, the init), or has no meaning
        for key, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
                raise ValueError(f"HiraConfig.{key}: `r` should be a positive integer value but the value passed is "
                                 f"{r!r}.")
        if not (self.init_weights in (True, False, None) or (isinstance(self.init_weights, str)
                                                              and self.init_weights.lower() == "gaussian")):
            raise ValueError(f"Unknown initialization init_weights={self.init_weights!r}: HiraConfig.init_weights is "
                             "True, False or 'gaussian'.")
        check_dropout(self, "hira_dropout")


def check_site(module: nn.Module, site: Site, weight, config: HiraConfig) -> None:
    """PEFT's refusal of grouped convolutions (W ⊙ B A needs B A shaped like W), before any adapter is made."""
    groups = getattr(module, "groups", 1)
    if site.kind == "conv" and groups > 1:
        raise NotImplementedError(f"HiRA does not support {type(module).__name__} layers with groups > 1 (got "
                                  f"groups={groups}) such as {site.path!r}: W ⊙ (B A) needs B A shaped like W. "
                                  "Leave it out of target_modules.")


def add_hira(module: nn.Module, site: Site, weight, config: HiraConfig, adapter: str) -> None:
    """PEFT's ``update_layer`` per layer type, its draws in its order."""
    r = pattern_value(config.rank_pattern, site.path, config.r)
    init = config.init_weights
    if site.kind == "embedding":
        vocab, dim = weight.shape
        a, b = torch.randn(r, vocab), torch.randn(dim, r)
        if init:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        names = ("hira_embedding_A", "hira_embedding_B")
    else:
        out_f, in_f = out_in(site, weight) if site.kind == "linear" else weight.shape[:2]
        kernel = tuple(weight.shape[2:]) if site.kind == "conv" else ()
        a, b = torch.randn(r, in_f, *kernel), torch.randn(out_f, r, *(1,) * len(kernel))
        if init:
            if isinstance(init, str) and site.kind == "linear":  # "gaussian": linear sites only, as PEFT
                nn.init.normal_(a, std=1 / r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        names = ("hira_A", "hira_B")
    dtype = adapter_dtype(weight)
    for name, tensor in zip(names, (a, b)):
        child_dict(module, name, nn.ParameterDict)[adapter] = nn.Parameter(tensor.to(weight.device, dtype))
    dropout = config.hira_dropout if site.kind != "embedding" else 0.0
    child_dict(module, "hira_dropout")[adapter] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
    child_dict(module, "hira_gate")[adapter] = AdapterGate(1.0, dropout).to(weight.device)


def modulation(a: torch.Tensor, b: torch.Tensor, kind: str, fan_in_fan_out: bool) -> torch.Tensor:
    """B A in the stored layout of the site's weight (PEFT's ``get_delta_weight``)."""
    if kind == "embedding":
        return (b @ a).T
    if kind == "conv":  # B (out, r, 1, …), A (r, in, *kernel): B A over the flattened kernel
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)).reshape(b.shape[0], *a.shape[1:])
    product = b @ a
    return product.T if fan_in_fan_out else product


def hira_delta(x, site_module: nn.Module, weight_name: str, a, b, kind: str, fan_in_fan_out: bool, conv: tuple):
    """(W ⊙ B A) applied to x as the site's op: W read through the site module, in the adapter's dtype."""
    weight = float_weight(site_module, weight_name).to(a.dtype) * modulation(a, b, kind, fan_in_fan_out)
    if kind == "embedding":
        return F.embedding(x, weight)
    if kind == "conv":
        conv_fn = (F.conv1d, F.conv2d, F.conv3d)[weight.dim() - 3]
        return conv_fn(x, weight, None, *conv)
    return F.linear(x, weight.T if fan_in_fan_out else weight)


def _factors(kind: str) -> tuple[str, str]:
    return ("hira_embedding_A", "hira_embedding_B") if kind == "embedding" else ("hira_A", "hira_B")


def delta(lw, site: Site, module: nn.Module, adapter: str, x):
    a_name, b_name = _factors(site.kind)
    conv = (module.stride, module.padding, module.dilation, module.groups) if site.kind == "conv" else ()
    return lw.call(hira_delta, x, lw.attr(site.path), site.weight.rpartition(".")[2],
                   lw.attr(f"{site.path}.{a_name}.{adapter}"), lw.attr(f"{site.path}.{b_name}.{adapter}"), site.kind,
                   site.fan_in_fan_out, conv)


def adapter_modulation(site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    a_name, b_name = _factors(site.kind)
    return modulation(module._modules[a_name][adapter], module._modules[b_name][adapter], site.kind,
                      site.fan_in_fan_out) * module.hira_gate[adapter].scale


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """W ⊙ B A for the site's weight as it is now (the unmerged adapter's ΔW)."""
    weight = float_weight(module, site.weight.rpartition(".")[2]).detach()
    return weight * adapter_modulation(site, module, adapter).to(weight.dtype)


def factor_a(module: nn.Module, adapter: str) -> torch.Tensor:
    """The adapter's A, whichever kind of site holds it."""
    holder = module.hira_A if adapter in module._modules.get("hira_A", ()) else module.hira_embedding_A
    return holder[adapter]


def fold(gm, site: Site, module: nn.Module, adapter: str, weight, bias, sign):
    """PEFT's merge: ``W + W₀ ⊙ B A``, W₀ the weight before any HiRA adapter at this site was merged —
    passed on, within one fold of several adapters, as an attribute of the weight this returns, kept
    on a merged adapter's gate between folds; unmerging subtracts it again."""
    gate = module.hira_gate[adapter]
    change = adapter_modulation(site, module, adapter).detach().to(weight.dtype)
    if sign > 0:
        base = getattr(weight, "_fxpeft_hira_base", None)
        if base is None:
            base = next((g.stash for g in module.hira_gate.values() if g.merged and g.stash is not None), None)
        if base is None:  # kept in host memory, as PEFT keeps it: a copy of every merged weight
            base = weight.detach().to("cpu", copy=True)
        gate.stash = base
        merged = weight + base.to(weight) * change
        merged._fxpeft_hira_base = base
        return merged, bias
    base = gate.stash
    if base is None:  # W₀ ⊙ (1 + Σ B A) of the adapters still merged here, divided back (PEFT's 4-bit unmerge)
        total = sum(adapter_modulation(site, module, name).detach().to(weight.dtype)
                    for name, g in module.hira_gate.items() if g.merged)
        base = weight / (1 + total)
    gate.stash = None
    return weight - base.to(weight) * change, bias


METHOD = register_method(dataclasses.replace(additive(
    name="hira", config_type=HiraConfig, create=add_hira, delta=delta, delta_weight=delta_weight,
    containers=CONTAINERS, gates="hira_gate", dropouts="hira_dropout", kinds=("linear", "conv", "embedding"),
    check_site=check_site, dtype_of=lambda module, adapter: factor_a(module, adapter).dtype,
    default_targets=DEFAULT_HIRA_TARGETS, heads=output_heads,
    describe=lambda module, adapter: f"r={factor_a(module, adapter).shape[0]}"),
    fold=fold))
