"""Adaption prompts (LLaMA-Adapter), PEFT's tuners/adaption_prompt.

For the top ``adapter_layers`` attention modules (``target_modules``: a module-name suffix, PEFT's
per-architecture default), ``adapter_len`` learned tokens are projected by the layer's own key and
value projections and attended by the layer's queries in a softmax of their own (no mask, no rotary
embedding on the adapter keys; queries as the model's attention gets them, rotated), gated by a
learned scalar that starts at zero:

    a   = gate · softmax(q kᵀ / √head_dim, float32).to(q.dtype) · v        k, v = k_proj(P), v_proj(P)
    out = attention(x) + o_proj(a)                                          (Llama, Mistral)
    out = attention(x) + a                                                  (GPT-2: after c_proj, as PEFT)

GPT-2's keys and values are the 2nd and 3rd thirds of ``c_attn(P)``. Grouped key/value heads are
repeated like the model's. ``o_proj`` is the layer's own op, bias included (PEFT calls the module).

State, PEFT's names beside the attention module: ``<attn>.adaption_prompt.<adapter>`` (1, adapter_len,
hidden), drawn N(0, 1) in layer order as PEFT draws it, and ``<attn>.adaption_gate.<adapter>`` (1,),
zero. Checkpoints hold both under PEFT's keys (``...self_attn.adaption_prompt``). Several adapters may
exist, one acts (PEFT swaps modules; here each adapter's output is multiplied by its activity gate,
so switching is data; ``set_adapter`` refuses several names, as PEFT). No merging (PEFT has none), no
per-sample adapters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from fxpeft.canonical import innermost_module
from fxpeft.configs import PeftConfigBase
from fxpeft.forms import child_dict
from fxpeft.registry import Method, Rule, register_method, registry_of
from fxpeft.rewrite import Lowering, primary_lowering

from .prefix import is_attention, node_arg, node_shape

PROMPTS, GATES = "adaption_prompt", "adaption_gate"


@dataclass(frozen=True)
class AttentionLayout:
    """PEFT's ``ModelTypeConfig``: the default target and the attention's projections by name (``value``
    None: keys and values are two thirds of ``key``'s output; ``output`` None: the adapter's output is
    added as it is)."""

    target_modules: str
    key: str
    value: Optional[str]
    output: Optional[str]


# PEFT's TRANSFORMERS_MODEL_CONFIG
LAYOUTS = {
    "llama": AttentionLayout("self_attn", "k_proj", "v_proj", "o_proj"),
    "mistral": AttentionLayout("self_attn", "k_proj", "v_proj", "o_proj"),
    "gpt2": AttentionLayout("attn", "c_attn", None, None),
}


@dataclass
class AdaptionPromptConfig(PeftConfigBase):
    """PEFT's AdaptionPromptConfig: ``target_modules`` (the attention modules' name; None: PEFT's default
    for the model type), ``adapter_len`` (prompt tokens per layer), ``adapter_layers`` (adapted layers,
    counted from the top)."""

    target_modules: Optional[str] = None
    adapter_len: Optional[int] = None
    adapter_layers: Optional[int] = None

    peft_type = "ADAPTION_PROMPT"

    def __post_init__(self):
        super().__post_init__()
        # PEFT checks none of these and fails later (a TypeError comparing None; adapter_layers=0 slices
        # [-0:] and adapts every layer): refused here, with what to give instead
        for name in ("adapter_len", "adapter_layers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"AdaptionPromptConfig.{name} must be a positive integer, got {value!r}.")
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ValueError("AdaptionPromptConfig.target_modules is one module name (the attention modules' "
                             f"attribute name, e.g. 'self_attn'), got {self.target_modules!r}.")


def _model_type(gm) -> Optional[str]:
    return getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)


def resolve_config(gm, sites, config: AdaptionPromptConfig) -> AdaptionPromptConfig:
    """PEFT's ``prepare_config``: the model type must be one PEFT adapts; its default target."""
    model_type = _model_type(gm)
    if model_type not in LAYOUTS:
        raise ValueError(f"Unsupported model type for adaption prompt: '{model_type}'. PEFT's adaption prompts "
                         f"support {sorted(LAYOUTS)}.")
    if config.target_modules is None:
        config.target_modules = LAYOUTS[model_type].target_modules
    return config


# ----------------------------------------------------------------------------- finding the attention in a graph


def _in_scope(node: torch.fx.Node, path: str) -> bool:
    module = innermost_module(node) or ""
    return module == path or module.startswith(path + ".")


def attention_parts(lw: Lowering, path: str, layout: AttentionLayout) -> dict:
    """What the rewrite reads of the attention module at ``path``: its SDPA node (queries), its output
    node (the one value leaving the module) and its projection sites; a ValueError naming what is missing."""
    attentions = [n for n in lw.graph.nodes if is_attention(n, lw.root) and innermost_module(n) == path]
    if len(attentions) != 1:
        raise ValueError(f"Adaption prompts need one scaled_dot_product_attention in {path!r}, found "
                         f"{len(attentions)}. Attention written out as matmul + softmax (attn_implementation="
                         "'eager') is not supported: load the model with attn_implementation='sdpa'.")
    leaving = [n for n in lw.graph.nodes if _in_scope(n, path) and isinstance(n.meta.get("val"), torch.Tensor)
               and any(not _in_scope(user, path) for user in n.users)]
    if len(leaving) != 1:
        raise ValueError(f"Adaption prompts add to the output of {path!r}, but {len(leaving)} values leave it "
                         f"in the graph ({[n.name for n in leaving]}); expected one.")
    sites = {s.path: s for s in lw.sites if s.kind == "linear"}
    names = {"key": layout.key, "value": layout.value, "out_proj": layout.output}
    found = {role: sites.get(f"{path}.{name}") for role, name in names.items() if name is not None}
    missing = [f"{path}.{names[role]}" for role, site in found.items() if site is None]
    if missing:
        raise ValueError(f"Adaption prompts read the attention's projections {missing}, which are not linear "
                         "layers in this model's graph.")
    query = node_arg(attentions[0], 0, "query")
    if node_shape(query) is None or len(node_shape(query)) != 4:
        raise ValueError(f"Adaption prompts read the heads of {path!r} from the graph's shapes, which it lacks.")
    return {"query": query, "output": leaving[0], **found}


def targeted_paths(gm, config: AdaptionPromptConfig) -> list[str]:
    """PEFT's choice: modules whose name ends with ``.<target_modules>``, in module order, the last
    ``adapter_layers`` of them."""
    paths = [path for path, _ in registry_of(gm).base_modules(gm) if path.endswith(f".{config.target_modules}")]
    if len(paths) < config.adapter_layers:
        raise ValueError(f"Config specifies more adapter layers '{config.adapter_layers}' than the model has "
                         f"'{len(paths)}'.")
    return paths[-config.adapter_layers:]


# ----------------------------------------------------------------------------- attach


def attach(gm, sites, config: AdaptionPromptConfig, adapter: str) -> list[str]:
    """``config`` arrives resolved (``resolve_config``). The prompts are drawn in layer order on the
    attention's device and in its projections' dtype (float32 for integer weights), as PEFT draws them
    (PEFT reads q_proj's / c_proj's dtype; a model's projections share one). No float32 autocast on
    half-precision bases: PEFT's adapter autocast skips this type."""
    layout = LAYOUTS[_model_type(gm)]
    paths = targeted_paths(gm, config)
    lowering = primary_lowering(gm)
    parts = {path: attention_parts(lowering, path, layout) for path in paths}  # every layer checked first
    for path in paths:
        weight = gm.get_parameter(parts[path]["key"].weight)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        hidden = node_shape(parts[path]["output"])[-1]
        prompt = torch.empty(1, config.adapter_len, hidden, device=weight.device, dtype=dtype).normal_()
        module = gm.get_submodule(path)
        child_dict(module, PROMPTS, nn.ParameterDict)[adapter] = nn.Parameter(prompt)
        child_dict(module, GATES, nn.ParameterDict)[adapter] = nn.Parameter(
            torch.zeros(1, device=weight.device, dtype=dtype))
    return paths


def adapters_at(module: nn.Module) -> list[str]:
    holder = module._modules.get(PROMPTS)
    return list(holder.keys()) if holder is not None else []


# ----------------------------------------------------------------------------- rewrite (helpers the graph calls)


def prompt_tokens(prompt: torch.Tensor, rank: int) -> torch.Tensor:
    """The prompt as the projection's input: (1, n, hidden), or (n, hidden) where the op takes rows
    (GPT-2's Conv1D: addmm over flattened tokens)."""
    return prompt if rank == 3 else prompt.reshape(-1, prompt.shape[-1])


def adapted_attention(query: torch.Tensor, keys: torch.Tensor, values: Optional[torch.Tensor],
                      gate: torch.Tensor) -> torch.Tensor:
    """The gated attention of the queries (batch, heads, q, head_dim) over the prompt's projected keys and
    values ((n, width) or (1, n, width); ``values`` None: ``keys`` is GPT-2's c_attn output, q|k|v), as
    (batch, q, heads·head_dim). PEFT's order of casts: scores in the queries' dtype, softmax in float32."""
    batch, heads, length, head_dim = query.shape
    if values is None:
        _, keys, values = keys.split(heads * head_dim, dim=-1)
    count = keys.shape[-2]
    kv_heads = keys.shape[-1] // head_dim
    keys = keys.reshape(1, count, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    values = values.reshape(1, count, kv_heads, head_dim).transpose(1, 2).repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.matmul(query, keys.transpose(2, 3).to(query.dtype)) / math.sqrt(head_dim)
    scores = gate * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(scores, values).transpose(1, 2).reshape(batch, length, -1)


def with_adaption(output: torch.Tensor, dtype: torch.dtype, *gated: torch.Tensor) -> torch.Tensor:
    """The attention's output plus each adapter's (already times its activity), in the queries' dtype."""
    for added in gated:
        output = output + added
    return output.to(dtype)


def match(lw: Lowering):
    """Adapted attention modules this graph computes (a model's top graph calls blocks instead)."""
    computed = {innermost_module(n) for n in lw.graph.nodes}
    for path, module in lw.registry.base_modules(lw.root):
        if path in computed and adapters_at(module):
            yield path


def _projected(lw: Lowering, site, prompt: torch.fx.Node) -> torch.fx.Node:
    """The site's own op (weight, bias, quantization) run on the prompt."""
    return lw.copy(site.node, {site.input: lw.call(prompt_tokens, prompt, len(node_shape(site.input)))})


def rewrite(lw: Lowering, path: str) -> None:
    if lw.mixed:  # the mixed graph fails to lower (calls with adapter_names= are refused: Method.mixed_batches)
        raise NotImplementedError("Adaption prompts cannot be picked per sample (PEFT has no adapter_names for them).")
    module = lw.module(path)
    parts = attention_parts(lw, path, _layout_of(module))
    output = parts["output"]
    users = [u for u in output.users if not _in_scope(u, path)]
    lw.tag["fxpeft_site"] = path
    added = []
    with lw.graph.inserting_before(output.next):  # in order, right after the attention's output
        for adapter in adapters_at(module):
            prompt = lw.attr(f"{path}.{PROMPTS}.{adapter}")
            keys = _projected(lw, parts["key"], prompt)
            values = _projected(lw, parts["value"], prompt) if "value" in parts else None
            gate = lw.attr(f"{path}.{GATES}.{adapter}")
            adapted = lw.call(adapted_attention, parts["query"], keys, values, gate)
            if "out_proj" in parts:
                adapted = lw.copy(parts["out_proj"].node, {parts["out_proj"].input: adapted})
            added.append(lw.call(torch.ops.aten.mul.Tensor, adapted, lw.gate(adapter)))
        dtype = parts["query"].meta["val"].dtype
        new = lw.call(with_adaption, output, dtype, *added)
    for user in users:
        user.replace_input_with(output, new)


def _layout_of(module: nn.Module) -> AttentionLayout:
    """The layout of an adapted attention module, from its children (a block's graph has no model config
    at hand; the layouts' projection names tell them apart)."""
    for layout in LAYOUTS.values():
        if hasattr(module, layout.key) and (layout.output is None or hasattr(module, layout.output)):
            return layout
    raise ValueError(f"Adaption prompts found no key projection in {type(module).__name__}.")


METHOD = register_method(Method(
    name="adaption_prompt", config_type=AdaptionPromptConfig, attach=attach, resolve_config=resolve_config,
    containers=(PROMPTS, GATES), adapters_at=adapters_at, mixed_batches=False, one_active=True,
    rules=(Rule(name="adaption_prompt", match=match, rewrite=rewrite, phase=20),),
    describe=lambda module, adapter: f"adapter_len={module._modules[PROMPTS][adapter].shape[1]}"))
