"""LoRA: ``y = W x + b + s * B(A(dropout(x)))`` on linear, Conv1D, conv and embedding sites.

State (attached beside the adapted module, PEFT's names):
    <path>.lora_A.<adapter>.weight, <path>.lora_B.<adapter>.weight          linear / conv
    <path>.lora_embedding_A.<adapter>, <path>.lora_embedding_B.<adapter>    embedding
    <path>.lora_dropout.<adapter>    (nn.Dropout / nn.Identity, no parameters)
    <path>.lora_scaling.<adapter>.value / .p   non-persistent buffers: s (0 once merged), dropout p
Rewrite (phase 50, output deltas), added to the site output:
    linear / embedding sites: the module's adapters stacked (padded to one rank, s folded into
    B) and gathered by the active slots (dense graph) or per sample (mixed graph);
    linear sites with a single adapter (dense graph) and conv sites: a gated delta per adapter.
Folding: ``delta_weight`` is what merging adds to the base weight.
"""
from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from fxpeft.canonical import LINEAR_LAYER_TYPES, Site, site_weight, submodule
from fxpeft.configs import DEFAULT_LORA_TARGETS, SEQ_CLS_HEAD_NAMES, LoraConfig
from fxpeft.rewrite import (Lowering, Method, is_adapter_state, register_method, register_rule, samples_of,
                            site_rule)
from fxpeft.targets import is_targeted, pattern_value, unmatched_target_error

aten = torch.ops.aten

# child modules holding per-adapter state beside an adapted module (PEFT's names)
CONTAINERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_dropout", "lora_scaling")


class AdapterScale(nn.Module):
    """A scalar the graph reads as data: the adapter's scaling, or 0 once merged into the base
    weight. (Whether an adapter is active is the module-wide ``_fxpeft_gates`` buffer.) Changing
    either never changes the graph, so a compiled module does not recompile.
    """

    def __init__(self, scale: float, dropout: float = 0.0):
        super().__init__()
        self.scale = float(scale)
        self.merged = False
        self.register_buffer("value", torch.tensor(self.scale), persistent=False)
        self.dropout = float(dropout)
        self.register_buffer("p", torch.tensor(self.dropout), persistent=False)  # LoRA dropout, as data

    def refresh(self) -> None:
        with torch.no_grad():
            self.value.fill_(0.0 if self.merged else self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, merged={self.merged}"


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _conv_geometry(site: Site):
    args = list(site.node.args) + [None] * 7
    stride, padding, dilation, groups = args[3] or 1, args[4] or 0, args[5] or 1, args[6] or 1
    return stride, padding, dilation, groups


def _new_lora_weights(site: Site, weight: torch.Tensor, r: int, init):
    """(A, B) parameter holders for one site, initialised as PEFT does."""
    if site.kind == "embedding":
        num, dim = weight.shape
        a, b = nn.Parameter(torch.randn(r, num)), nn.Parameter(torch.randn(dim, r))
        if init is not False:
            nn.init.zeros_(a)
            nn.init.normal_(b)
        return a, b
    if site.kind == "linear":
        out_f, in_f = weight.shape[::-1] if site.fan_in_fan_out else weight.shape
        a, b = nn.Linear(in_f, r, bias=False), nn.Linear(r, out_f, bias=False)
    else:
        stride, padding, _, groups = _conv_geometry(site)
        conv = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}[len(weight.shape)]
        kernel = tuple(weight.shape[2:])
        ones = (1,) * len(kernel)
        a = conv(weight.shape[1] * groups, r, kernel, stride, padding, bias=False)
        b = conv(r, weight.shape[0], ones, ones, groups=groups, bias=False)
    if init is True:
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    elif init == "gaussian":
        nn.init.normal_(a.weight, std=1 / r)
    if init is not False:
        nn.init.zeros_(b.weight)
    return a, b


def _child_dict(module: nn.Module, name: str, kind=nn.ModuleDict):
    if name not in module._modules:
        module.add_module(name, kind())
    return module._modules[name]


def add_lora(module: nn.Module, site: Site, weight, config: LoraConfig, adapter: str) -> None:
    r = pattern_value(config.rank_pattern, site.path, config.r)
    alpha = pattern_value(config.alpha_pattern, site.path, config.lora_alpha)
    scale = alpha / math.sqrt(r) if config.use_rslora else alpha / r
    a, b = _new_lora_weights(site, weight, r, config.init_lora_weights)
    dtype, device = _adapter_dtype(weight), weight.device
    if site.kind == "embedding":
        _child_dict(module, "lora_embedding_A", nn.ParameterDict)[adapter] = nn.Parameter(a.data.to(device, dtype))
        _child_dict(module, "lora_embedding_B", nn.ParameterDict)[adapter] = nn.Parameter(b.data.to(device, dtype))
    else:
        _child_dict(module, "lora_A")[adapter] = a.to(device, dtype)
        _child_dict(module, "lora_B")[adapter] = b.to(device, dtype)
    dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
    _child_dict(module, "lora_dropout")[adapter] = dropout
    _child_dict(module, "lora_scaling")[adapter] = AdapterScale(scale, config.lora_dropout).to(device)


def _output_head_paths(gm, config) -> set[str]:
    """What "all-linear" leaves out: the output embedding, or a SEQ_CLS head."""
    source = gm._fxpeft_source
    heads = set()
    get_output = getattr(source, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    names = {id(m): n for n, m in source.named_modules()}
    if output is not None:
        heads.add(names[id(output)])
    elif config.task_type == "SEQ_CLS":
        for name in SEQ_CLS_HEAD_NAMES:
            head = getattr(source, name, None)
            if head is not None:
                heads.add(names[id(head)])
                break
    return heads


def resolve_targets(gm, sites: list[Site], config: LoraConfig) -> LoraConfig:
    """PEFT's defaults for target_modules: a per-architecture table, and "all-linear"."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)
        if model_type not in DEFAULT_LORA_TARGETS:
            raise ValueError(
                f"target_modules is None and fxpeft has no default targets for model type {model_type!r}; "
                "set LoraConfig(target_modules=[...]) (e.g. 'all-linear')."
            )
        targets = list(DEFAULT_LORA_TARGETS[model_type])
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _output_head_paths(gm, config)
        targets = sorted({s.path for s in sites if s.kind == "linear"
                          and isinstance(gm.get_submodule(s.path), tuple(LINEAR_LAYER_TYPES)) and s.path not in heads})
    return dataclasses.replace(config, target_modules=targets)


# Layer types LoRA adapts (PEFT's list, less nn.MultiheadAttention): a targeted module of another
# type is an error, as in PEFT, never skipped.
ADAPTABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _check_unadaptable(gm, config: LoraConfig, adaptable: dict) -> None:
    """Targeted modules that are no site: an unsupported type (a LayerNorm a regex also matched, a
    ConvTranspose2d, a container) raises as PEFT does, instead of leaving it silently unadapted."""
    attention = [name for name, m in gm.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name, module in gm.named_modules():
        if (not name or name in adaptable or name.startswith("_fxpeft")  # fxpeft's own: mode switches, slots
                or is_adapter_state(name) or not is_targeted(config, name)):
            continue
        inside = next((a for a in attention if name == a or name.startswith(a + ".")), None)
        if inside is not None:
            raise NotImplementedError(
                f"target_modules {config.target_modules!r} matched {name!r} ({type(module).__name__}) in the "
                f"nn.MultiheadAttention {inside!r}: PEFT adapts nn.MultiheadAttention, fxpeft does not yet. "
                "Leave it out of target_modules (or exclude_modules=[...] it).")
        if not isinstance(module, (*LINEAR_LAYER_TYPES, *ADAPTABLE_TYPES)):
            raise ValueError(
                f"Target module {name!r} ({type(module).__name__}) is not supported: target_modules "
                f"{config.target_modules!r} matched it, but it is not a linear, Conv1D, conv or embedding layer, so "
                "LoRA cannot adapt it (PEFT raises too). Narrow target_modules to the layers inside it, or "
                "exclude_modules=[...] it.")


def attach(gm, sites: list[Site], config: LoraConfig, adapter: str) -> list[str]:
    """``config`` arrives with its targets resolved (``Method.resolve_config``). Adapters are created
    in module order, as PEFT does, so the same seed gives PEFT's initial weights."""
    adaptable: dict[str, Site] = {}
    for site in sites:
        if submodule(gm, site.path) is not None:
            adaptable.setdefault(site.path, site)
    _check_unadaptable(gm, config, adaptable)
    matched = [name for name, _ in gm.named_modules() if name in adaptable and is_targeted(config, name)]
    if not matched:
        raise unmatched_target_error(config, list(adaptable))
    for path in matched:
        site = adaptable[path]
        add_lora(gm.get_submodule(path), site, site_weight(gm, site), config, adapter)
    return matched


# ----------------------------------------------------------------------------- rewrite



def _single_delta(lw: Lowering, site: Site, module: nn.Module, adapter: str, gated: bool = True):
    """One adapter's ``s * B(A(dropout(x)))`` at a linear or conv site, times its gate in dense
    graphs: the plain LoRA subgraph, used where stacking adapters would only add work."""
    path = site.path
    base_dtype = site_weight(lw.root, site).dtype
    adapter_dtype = module.lora_A[adapter].weight.dtype
    x = lw.cast(site.input, adapter_dtype, base_dtype)
    if not isinstance(module.lora_dropout[adapter], nn.Identity):
        x = lw.call_module(f"{path}.lora_dropout.{adapter}", x)
    a_weight, b_weight = lw.attr(f"{path}.lora_A.{adapter}.weight"), lw.attr(f"{path}.lora_B.{adapter}.weight")
    if site.kind == "linear":
        delta = lw.call(aten.linear.default, lw.call(aten.linear.default, x, a_weight), b_weight)
    else:
        a_conv, b_conv = module.lora_A[adapter], module.lora_B[adapter]
        op = {1: aten.conv1d, 2: aten.conv2d, 3: aten.conv3d}[a_conv.weight.dim() - 2]
        a_op = op.padding if isinstance(a_conv.padding, str) else op.default
        a_padding = a_conv.padding if isinstance(a_conv.padding, str) else list(a_conv.padding)
        hidden = lw.call(a_op, x, a_weight, None, list(a_conv.stride), a_padding)
        ones = [1] * len(b_conv.stride)
        delta = lw.call(op.default, hidden, b_weight, None, ones, [0] * len(ones), ones, b_conv.groups)
    coefficient = lw.attr(f"{path}.lora_scaling.{adapter}.value")
    if gated:  # scalar work first: one elementwise pass over the delta, as an ungated adapter costs
        coefficient = lw.call(aten.mul.Tensor, coefficient, lw.gate(adapter))
    delta = lw.call(aten.mul.Tensor, delta, coefficient)
    return lw.cast(delta, base_dtype, adapter_dtype)


def rewrite(lw: Lowering, site: Site):
    """Linear and embedding sites with several adapters (or in the mixed graph): every adapter of
    the module is stacked once per call and the active ones (dense graph: the module's
    ``_fxpeft_slots``) or each sample's own (mixed graph) are gathered, so the cost does not grow
    with the number of adapters loaded. A linear site with one adapter gets the plain gated LoRA
    subgraph; conv sites get one gated delta per adapter."""
    module = lw.module(site.path)
    if site.kind == "conv" or (site.kind == "linear" and not lw.mixed and len(adapters_at(module)) == 1):
        return _rewrite_per_adapter(lw, site, module)
    base_dtype = site_weight(lw.root, site).dtype
    adapter_dtype = _adapter_dtype(site_weight(lw.root, site))
    a_stack, b_stack = _stacks(lw, site, module)
    index = lw.sample_index if lw.mixed else lw.slots()
    if site.kind == "embedding":
        padding_idx = site.node.args[2] if len(site.node.args) > 2 else -1
        helper = lora_mixed_embedding if lw.mixed else lora_slots_embedding
        delta = lw.call(helper, site.input, index, a_stack, b_stack, padding_idx)
    elif lw.mixed:
        delta = lw.call(lora_mixed_linear, lw.cast(site.input, adapter_dtype, base_dtype), index, a_stack, b_stack)
    else:
        _ensure_slots_module(lw.root)
        x = lw.cast(site.input, adapter_dtype, base_dtype)
        delta = lw.call_module(SLOTS_MODULE, x, index, a_stack, b_stack, _dropout_stack(lw, site, module))
    return lw.call(aten.add.Tensor, site.output, lw.cast(delta, base_dtype, adapter_dtype))


def _rewrite_per_adapter(lw: Lowering, site: Site, module: nn.Module):
    """Conv sites, and linear sites with a single adapter in the dense graph."""
    output = site.output
    for adapter in adapters_at(module):
        delta = _single_delta(lw, site, module, adapter, gated=not lw.mixed)
        if lw.mixed:
            delta = lw.call(lora_mixed_masked, delta, lw.sample_index, lw.adapter_order.index(adapter))
        output = lw.call(aten.add.Tensor, output, delta)
    return output


SLOTS_MODULE = "_fxpeft_lora_slots"


class LoraSlots(nn.Module):
    """The active adapters of a linear site in one computation: ``x [A_s1^T|A_s2^T|…] [B_s1^T; …]``.

    A module (stateless) only so that it can follow ``.train()/.eval()`` for LoRA dropout,
    whose probability per adapter is data (``p_stack``).
    """

    def forward(self, x, slots, a_t_stack, b_t_stack, p_stack=None):
        a = a_t_stack.index_select(0, slots)  # (S, in, r)
        b = b_t_stack.index_select(0, slots)  # (S, r, out)
        if self.training and p_stack is not None:  # each active adapter sees its own dropout of x
            p = p_stack.index_select(0, slots)
            out = None
            for slot in range(a.shape[0]):
                kept = x * (torch.rand_like(x) >= p[slot]).to(x.dtype) / (1 - p[slot])
                term = (kept @ a[slot]) @ b[slot]
                out = term if out is None else out + term
            return out
        return (x @ a.permute(1, 0, 2).reshape(a.shape[1], -1)) @ b.reshape(-1, b.shape[-1])


def _ensure_slots_module(root: nn.Module) -> None:
    if SLOTS_MODULE not in root._modules:
        root.add_module(SLOTS_MODULE, LoraSlots().train(root.training))


def lora_slots_embedding(ids, slots, a_stack, b_t_stack, padding_idx: int = -1):
    """Embedding sites, the active adapters: one lookup in the concatenated A tables."""
    a = a_stack.index_select(0, slots)  # (S, r, num)
    table = a.permute(2, 0, 1).reshape(a.shape[2], -1)
    hidden = torch.nn.functional.embedding(ids, table, padding_idx if padding_idx >= 0 else None)
    return hidden @ b_t_stack.index_select(0, slots).reshape(-1, b_t_stack.shape[-1])


def _dropout_stack(lw: Lowering, site: Site, module: nn.Module):
    """Per-adapter dropout probabilities (None when no adapter of the site uses dropout)."""
    present = adapters_at(module)
    if not any(module.lora_scaling[a].dropout > 0 for a in present):
        return None
    probabilities = {a: lw.attr(f"{site.path}.lora_scaling.{a}.p") for a in present}
    zero = lw.call(aten.zeros_like.default, next(iter(probabilities.values())))
    return lw.call(aten.stack.default, [probabilities.get(a, zero) for a in lw.adapter_order] + [zero])


# per-sample adapters (adapter_names=[...]): one gathered computation for the whole batch


def lora_mixed_linear(x, index, a_t_stack, b_t_stack):
    """Row b of the batch gets ``x_b A_{index[b]}^T B_{index[b]}^T``. The stacks hold every
    adapter's A^T (in, r) and B^T (r, out), padded to one rank, scaling folded into B, plus a
    zero slot for "no adapter"; gathering per sample and two batched matmuls replace a loop
    over adapters."""
    batch = index.shape[0]
    rows = x.reshape(batch, -1, x.shape[-1])
    hidden = torch.bmm(rows, a_t_stack.index_select(0, index))
    delta = torch.bmm(hidden, b_t_stack.index_select(0, index))
    return delta.reshape(*x.shape[:-1], delta.shape[-1])


def lora_mixed_embedding(ids, index, a_stack, b_t_stack, padding_idx: int = -1):
    """Embedding sites: look up every adapter's A rows at once, keep each sample's own."""
    slots, rank, num = a_stack.shape
    table = a_stack.permute(2, 0, 1).reshape(num, slots * rank)
    hidden = torch.nn.functional.embedding(ids, table, padding_idx if padding_idx >= 0 else None)
    hidden = hidden.reshape(ids.shape[0], -1, slots, rank)
    pick = index.view(-1, 1, 1, 1).expand(-1, hidden.shape[1], 1, rank)
    hidden = hidden.gather(2, pick).squeeze(2)
    delta = torch.bmm(hidden, b_t_stack.index_select(0, index))
    return delta.reshape(*ids.shape, delta.shape[-1])


def lora_mixed_masked(delta, index, slot: int):
    """Conv sites: an adapter's full delta, kept only for the samples that asked for it."""
    return delta * samples_of(index, slot, delta).to(delta.dtype)


def _stacks(lw: Lowering, site: Site, module: nn.Module):
    """(A stack, B^T stack) nodes: one slot per adapter of the module (zeros where this site has
    none), padded to the largest rank, scaling folded into B, then a zero slot. Linear sites
    stack A^T so both batched matmuls read contiguous operands."""
    embedding = site.kind == "embedding"
    present = adapters_at(module)
    ranks = {a: (module.lora_embedding_A[a] if embedding else module.lora_A[a].weight).shape[0] for a in present}
    rank = max(ranks.values())
    a_slots, b_slots = [], []
    template_a = template_b = None
    for adapter in lw.adapter_order:
        if adapter not in present:
            a_slots.append(None)
            b_slots.append(None)
            continue
        a_name = f"{site.path}.lora_embedding_A.{adapter}" if embedding else f"{site.path}.lora_A.{adapter}.weight"
        b_name = f"{site.path}.lora_embedding_B.{adapter}" if embedding else f"{site.path}.lora_B.{adapter}.weight"
        a, b = lw.attr(a_name), lw.attr(b_name)
        b = lw.call(aten.mul.Tensor, b, lw.attr(f"{site.path}.lora_scaling.{adapter}.value"))
        pad = rank - ranks[adapter]
        if pad:
            a = lw.call(aten.constant_pad_nd.default, a, [0, 0, 0, pad])
            b = lw.call(aten.constant_pad_nd.default, b, [0, pad])
        if not embedding:
            a = lw.call(aten.t.default, a)
        b = lw.call(aten.t.default, b)
        a_slots.append(a)
        b_slots.append(b)
        template_a, template_b = template_a or a, template_b or b
    zero_a = lw.call(aten.zeros_like.default, template_a)
    zero_b = lw.call(aten.zeros_like.default, template_b)
    a_stack = lw.call(aten.stack.default, [s or zero_a for s in a_slots] + [zero_a])
    b_stack = lw.call(aten.stack.default, [s or zero_b for s in b_slots] + [zero_b])
    return a_stack, b_stack


# ----------------------------------------------------------------------------- folding


def delta_weight(gm, site: Site, module: nn.Module, adapter: str) -> torch.Tensor:
    """s * B A in the layout of the site's weight (what merging adds to it)."""
    scale = module.lora_scaling[adapter].scale
    if site.kind == "embedding":
        a, b = module.lora_embedding_A[adapter], module.lora_embedding_B[adapter]
        return (b @ a).T * scale
    a, b = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if site.kind == "linear":
        delta = b @ a
        return (delta.T if site.fan_in_fan_out else delta) * scale
    if module.lora_B[adapter].groups != 1:
        raise NotImplementedError(f"Merging LoRA into the grouped convolution {site.path} is not supported.")
    conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d, 5: torch.nn.functional.conv3d}[a.dim()]
    return conv(a.transpose(0, 1), b).transpose(0, 1) * scale


def adapters_at(module: nn.Module) -> list[str]:
    scales = module._modules.get("lora_scaling")
    return list(scales.keys()) if scales is not None else []


def gate(module: nn.Module, adapter: str) -> AdapterScale:
    return module.lora_scaling[adapter]


register_rule(site_rule("lora", lambda site, module: bool(adapters_at(module)), rewrite, phase=50))
register_method(Method(config_type=LoraConfig, attach=attach, containers=CONTAINERS,
                       adapters_at=adapters_at, gate=gate, delta_weight=delta_weight,
                       resolve_config=resolve_targets))
