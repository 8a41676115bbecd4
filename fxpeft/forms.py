"""Method forms: the few shapes PEFT's site methods take, each a factory returning a :class:`Method`.

A method file in ``passes/`` supplies its math; the form supplies the rest: which modules it
attaches to (PEFT's targeting rules), the graph splicing, gates (active / merged as data the
graph reads), dtype casts around half-precision and quantized bases, mixed-batch support and
merging.

- :func:`additive`: ``y + Σ g_a Δ_a(x)`` (LoRA, LoHa, LoKr, VeRA, AdaLoRA …); merging adds
  ``ΔW_a`` to the weight and unmerging subtracts it.
- :func:`scaling`: a learned vector multiplies the site's input or output (IA3); merging
  multiplies the weight (and, for outputs, the bias) and refuses a near-zero scale, since
  unmerging divides by it.
- :func:`weight_map`: the site computes with ``map(W)`` instead of ``W`` (DoRA, OFT …);
  merging folds the map into the weight, unmerging unfolds it.

The sequence methods (prompt, prefix tuning) edit the token sequence, not sites: they are
plain :class:`Method` values with node rules (passes/prompt.py, passes/prefix.py).

Every site method keeps, beside each adapted module, a ``<gates>.<adapter>`` :class:`AdapterGate`
(non-persistent: not in any checkpoint) whose ``value`` the graph reads: the adapter's scale
while unmerged, 0 once merged. Whether an adapter is active is the module-wide gates buffer.
Neither ever changes the graph, so a compiled module does not recompile.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.fx.graph_module import _forward_from_src

from .canonical import Site, is_sharded, site_weight, submodule
from .generation import KEPT_HOLDERS, KeptTensors, generate_step, kept_places, kept_roots, reads_cache
from .registry import Method, call_prepared, registry_of, site_rule
from .rewrite import Lowering, samples_of
from .state import sites_by_path
from .targets import is_targeted, unmatched_target_error

aten = torch.ops.aten

KIND_NAMES = {"linear": "linear (nn.Linear, Conv1D)", "conv": "convolution", "embedding": "embedding"}
# module types a site of each kind may be (a targeted module of another type is an error, as in PEFT)
KIND_TYPES = {"conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d), "embedding": (nn.Embedding,)}


class AdapterGate(nn.Module):
    """The scalar the graph multiplies one adapter's contribution at one site by: its scale while
    unmerged, 0 once merged into the base weight. ``p`` is the adapter's dropout probability, as
    data (0 without dropout). ``stash`` holds what unmerging needs that the weights no longer say
    (weight maps)."""

    def __init__(self, scale: float = 1.0, dropout: float = 0.0):
        super().__init__()
        self.scale = float(scale)
        self.merged = False
        self.stash = None
        self.register_buffer("value", torch.tensor(self.scale), persistent=False)
        self.dropout = float(dropout)
        self.register_buffer("p", torch.tensor(self.dropout), persistent=False)

    def refresh(self) -> None:
        with torch.no_grad():
            self.value.fill_(0.0 if self.merged else self.scale)

    def extra_repr(self) -> str:
        return f"scale={self.scale}, merged={self.merged}"


def adapter_dtype(weight) -> torch.dtype:
    """PEFT's autocast_adapter_dtype: half-precision bases get float32 adapters."""
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


class SharedTensors(nn.Module):
    """Per-adapter tensors kept once on the transformed module (not beside each site) and read by
    every site of a method: VeRA's shared random projections. Buffers (never trained), persistent
    or not as the method saves them; registered on the root under a name the method lists in
    ``Method.shared`` (and ``containers``), which makes them readable as ``<name>.<adapter>`` from
    every graph, blocks included, and saved under PEFT's tuner-level key ``base_model.<name>``."""

    def __init__(self, persistent: bool = True):
        super().__init__()
        self.persistent = bool(persistent)

    def __setitem__(self, adapter: str, tensor: torch.Tensor) -> None:
        self.register_buffer(adapter, tensor, persistent=self.persistent)

    def __getitem__(self, adapter: str) -> torch.Tensor:
        return self._buffers[adapter]

    def __delitem__(self, adapter: str) -> None:
        del self._buffers[adapter]
        self._non_persistent_buffers_set.discard(adapter)

    def __contains__(self, adapter: str) -> bool:
        return adapter in self._buffers

    def __len__(self) -> int:
        return len(self._buffers)

    def keys(self):
        return self._buffers.keys()

    def values(self):
        return self._buffers.values()

    def _apply(self, fn, recurse=True):
        """``.to()/.half()``: a tensor several adapters share (VeRA's later adapters alias the first
        one's projections) is converted once and stays shared."""
        converted = {}
        for key, tensor in self._buffers.items():
            if tensor is not None:
                if id(tensor) not in converted:
                    converted[id(tensor)] = fn(tensor)
                self._buffers[key] = converted[id(tensor)]
        return self

    def extra_repr(self) -> str:
        return ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self._buffers.items()) + f", persistent={self.persistent}"


def shared_tensors(gm: nn.Module, name: str, persistent: bool = True) -> SharedTensors:
    """``gm.<name>``, the :class:`SharedTensors` a method keeps on the root, created on first use."""
    if name not in gm._modules:
        gm.add_module(name, SharedTensors(persistent))
    return gm._modules[name]


def child_dict(module: nn.Module, name: str, kind=nn.ModuleDict):
    """``module.<name>``, a ModuleDict / ParameterDict keyed by adapter, created on first use."""
    if name not in module._modules:
        module.add_module(name, kind())
    return module._modules[name]


# ----------------------------------------------------------------------------- targeting


def resolve_targets(gm, sites: list[Site], config, default_targets: dict, heads: Callable = None):
    """PEFT's defaults for ``target_modules``: a per-architecture table when None, and "all-linear"
    (every linear site but the output head, ``heads(gm, config)``)."""
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(gm._fxpeft_source, "config", None), "model_type", None)
        if model_type not in default_targets:
            raise ValueError(
                f"target_modules is None and fxpeft has no default targets for model type {model_type!r}; "
                f"set {type(config).__name__}(target_modules=[...]) (e.g. 'all-linear').")
        targets = list(default_targets[model_type])
    elif isinstance(targets, str) and targets.lower() == "all-linear":
        skip = heads(gm, config) if heads is not None else set()
        linear = tuple(registry_of(gm).linear_types)
        targets = sorted({s.path for s in sites if s.kind == "linear"
                          and isinstance(gm.get_submodule(s.path), linear) and s.path not in skip})
    return dataclasses.replace(config, target_modules=targets)


def _check_unadaptable(gm, config, adaptable: dict, method_name: str, kinds) -> None:
    """Targeted modules that are no site of a supported kind raise, as PEFT does, instead of being
    left silently unadapted (a LayerNorm a regex also matched, a ConvTranspose2d, a container)."""
    registry = registry_of(gm)
    allowed = tuple(registry.linear_types) if "linear" in kinds else ()
    allowed += tuple(t for kind in kinds for t in KIND_TYPES.get(kind, ()))
    modules = list(registry.base_modules(gm))
    attention = [name for name, m in modules if isinstance(m, nn.MultiheadAttention)]
    for name, module in modules:
        if not name or name in adaptable or not is_targeted(config, name):
            continue
        inside = next((a for a in attention if name == a or name.startswith(a + ".")), None)
        if inside == name:
            raise NotImplementedError(
                f"target_modules {config.target_modules!r} matched the nn.MultiheadAttention {name!r}: {method_name} "
                "does not adapt nn.MultiheadAttention. Leave it out of target_modules (or exclude_modules=[...] it).")
        if inside is not None:
            raise NotImplementedError(
                f"target_modules {config.target_modules!r} matched {name!r} ({type(module).__name__}) inside the "
                f"nn.MultiheadAttention {inside!r}, whose forward reads that layer's weights itself: it cannot be "
                f"adapted on its own. Target the attention module ({inside!r}) with LoRA, as PEFT does, or leave it "
                "out of target_modules (or exclude_modules=[...] it).")
        if not isinstance(module, allowed):
            raise ValueError(
                f"Target module {name!r} ({type(module).__name__}) is not supported: target_modules "
                f"{config.target_modules!r} matched it, but {method_name} adapts only "
                f"{', '.join(KIND_NAMES[k] for k in kinds)} layers (PEFT raises too). Narrow target_modules to the "
                "layers inside it, or exclude_modules=[...] it.")


def attach_sites(gm, sites: list[Site], config, adapter: str, *, create: Callable, kinds, method_name: str,
                 check_site: Optional[Callable] = None, prepare: Optional[Callable] = None) -> list[str]:
    """Create the adapter at every targeted site, in module order as PEFT does (so the same seed
    gives PEFT's initial weights): ``create(module, site, weight_spec, config, adapter)``.

    Every targeted site is checked before any is created: its kind, and ``check_site(module, site,
    weight_spec, config)`` if given, which raises for a site the method cannot take. A ``create``
    that changes the base weight (an init that reads and rewrites it) thus never runs on a config
    that fails at a later site: the weights, shared with the caller's model, stay as they were.

    ``prepare(gm, targets, config, adapter)`` (optional) runs once all are checked and before any is
    created, with ``targets`` the ``(module, site, weight_spec)`` of every targeted site in order:
    where a method makes state shared by all its sites (VeRA's projections, sized by the largest
    targeted layer), or checks a new adapter against that state."""
    adaptable: dict[str, Site] = {}
    for site in sites:
        if submodule(gm, site.path) is not None:
            adaptable.setdefault(site.path, site)
    _check_unadaptable(gm, config, adaptable, method_name, kinds)
    matched = [name for name, _ in registry_of(gm).base_modules(gm) if name in adaptable and is_targeted(config, name)]
    if not matched:
        raise unmatched_target_error(config, list(adaptable))
    for path in matched:
        site = adaptable[path]
        if site.kind not in kinds:
            raise ValueError(f"{method_name} does not support {KIND_NAMES[site.kind]} layers such as {path!r} "
                             f"({type(gm.get_submodule(path)).__name__}); leave it out of target_modules.")
        if check_site is not None:
            check_site(gm.get_submodule(path), site, site_weight(gm, site), config)
    if prepare is not None:
        prepare(gm, [(gm.get_submodule(p), adaptable[p], site_weight(gm, adaptable[p])) for p in matched], config,
                adapter)
    for path in matched:
        site = adaptable[path]
        create(gm.get_submodule(path), site, site_weight(gm, site), config, adapter)
    return matched


def _gates_of(gates: str):
    def adapters_at(module: nn.Module) -> list[str]:
        holder = module._modules.get(gates)
        return list(holder.keys()) if holder is not None else []

    def gate(module: nn.Module, adapter: str) -> AdapterGate:
        return module._modules[gates][adapter]

    return adapters_at, gate


def _site_method(*, name, config_type, create, kinds, containers, gates, default_targets, heads, adapters_at,
                 rules, fold, check_site=None, prepare=None, **fields) -> Method:
    attach = lambda gm, sites, config, adapter: attach_sites(  # noqa: E731
        gm, sites, config, adapter, create=create, kinds=kinds, method_name=name, check_site=check_site,
        prepare=prepare)
    resolve = fields.pop("resolve_config", None) or (  # a method with more to resolve than targets passes its own
        lambda gm, sites, config: resolve_targets(gm, sites, config, default_targets or {}, heads))
    default_adapters_at, gate = _gates_of(gates)
    return Method(name=name, config_type=config_type, attach=attach, resolve_config=resolve,
                  containers=tuple(dict.fromkeys((*containers, gates))), adapters_at=adapters_at or default_adapters_at,
                  gate=gate, fold=fold, rules=rules, **fields)


def _input_of(lw: Lowering, site: Site, module: nn.Module, adapter: str, dtype: torch.dtype,
              dropouts: Optional[str]):
    """The site's input in the adapter's dtype, through the adapter's dropout module if it has one
    (``module.<dropouts>.<adapter>``)."""
    x = lw.cast(site.input, dtype, site_weight(lw.root, site).dtype)
    holder = module._modules.get(dropouts) if dropouts else None
    if holder is not None and adapter in holder and not isinstance(holder[adapter], nn.Identity):
        x = lw.call_module(f"{site.path}.{dropouts}.{adapter}", x)
    return x


# ----------------------------------------------------------------------------- additive


def additive(*, name: str, config_type: type, create: Callable, delta: Callable, delta_weight: Callable,
             containers: tuple[str, ...], gates: str, dtype_of: Callable, dropouts: Optional[str] = None,
             kinds=("linear", "conv", "embedding"),
             default_targets: Optional[dict] = None, heads: Optional[Callable] = None,
             lower_site: Optional[Callable] = None, adapters_at: Optional[Callable] = None, phase: int = 50,
             scales_itself: bool = False, delta_bias: Optional[Callable] = None,
             delta_factors: Optional[Callable] = None, sampled: Optional[Callable] = None,
             site_parts: Optional[Callable] = None, kept_where: Optional[Callable] = None, **fields) -> Method:
    """A method adding ``g Δ(x)`` to a site's output.

    ``create(module, site, weight_spec, config, adapter)`` makes the adapter's state beside the
    module (an :class:`AdapterGate` under ``module.<gates>.<adapter>`` included);
    ``delta(lw, site, module, adapter, x)`` inserts ``Δ(x)`` (before scaling: the gate's ``value``
    holds the scale) for ``x`` already in the adapter's dtype, ``dtype_of(module, adapter)``, and
    through its dropout module ``module.<dropouts>.<adapter>`` (embedding sites: the token ids);
    ``delta_weight(gm, site, module, adapter)`` is the scaled ``ΔW`` in the layout of the site's
    weight, and ``delta_bias`` (optional, same arguments) the scaled change of its bias, or None.
    ``lower_site(lw, site, module, adapters)`` may replace the default lowering (one gated
    delta per adapter) with a faster one for some sites; it returns None to keep the default. With
    ``scales_itself`` the form passes the coefficient (gate value times activity) to
    ``delta(lw, site, module, adapter, x, coefficient)`` instead of multiplying by it, for methods
    whose reference applies the scale at a particular point of their computation.
    ``check_site(module, site, weight_spec, config)`` (optional, every form takes it) raises for a
    site the method cannot take; all targeted sites are checked before any is created
    (:func:`attach_sites`). ``prepare(gm, targets, config, adapter)`` (optional, every form takes it)
    then makes or checks the state the method shares across sites (:class:`SharedTensors`).

    Generation graphs (those reading a KV cache) read each site's adapters when they run
    (:class:`_KeptSites`), so that a load between compiled generate calls does not recompile: conv and
    embedding sites run the plain lowering as a program, linear sites compute their deltas from ``ΔW``
    instead, kept once per ``generate`` call: ``delta_factors(gm, site, module,
    adapter)`` (optional) gives a low-rank ``ΔW`` as ``(A, B)``, ``A`` (r, in) and ``B`` (out, r)
    with ``B A`` the scaled ``ΔW`` as (out, in), so that they cost what ``Δ(x)`` costs; ``()`` for an
    adapter changing no weight, None where only ``delta_weight`` says it; ``sampled(module, adapter)``
    (optional) says an adapter's delta is random in eval mode too (PVeRA's ``sample_at_inference``);
    ``site_parts(model, site, module, adapter, dtype, alone)`` (optional) gives the adapter as
    :class:`SiteParts` itself, for a method whose ΔW is not ``delta_weight``'s (weight-dependent ones).
    A method with its own ``lower_site`` takes this path only where ``lower_site`` declines a site of a
    generation graph, which ``kept_where(site, module, adapters)`` says (LoRA: conv and ``lora_bias`` sites).
    """
    site_adapters = adapters_at or _gates_of(gates)[0]

    def one_delta(lw: Lowering, site: Site, module: nn.Module, adapter: str):
        base_dtype = site_weight(lw.root, site).dtype
        dtype = dtype_of(module, adapter)
        x = site.input if site.kind == "embedding" else _input_of(lw, site, module, adapter, dtype, dropouts)
        coefficient = lw.attr(f"{site.path}.{gates}.{adapter}.value")
        if not lw.mixed:  # scalar work first: one elementwise pass over the delta, as an ungated adapter costs
            coefficient = lw.call(aten.mul.Tensor, coefficient, lw.gate(adapter))
        if scales_itself:
            value = delta(lw, site, module, adapter, x, coefficient)
        else:
            value = lw.call(aten.mul.Tensor, delta(lw, site, module, adapter, x), coefficient)
        if lw.mixed:  # only the samples that chose this adapter
            value = lw.call(masked_samples, value, lw.sample_index, lw.adapter_order.index(adapter))
        return lw.cast(value, base_dtype, dtype)

    def plain(lw: Lowering, site: Site, module: nn.Module, adapters: list[str]):
        output = site.output
        for adapter in adapters:
            output = lw.call(aten.add.Tensor, output, one_delta(lw, site, module, adapter))
        return output

    def rewrite(lw: Lowering, site: Site):
        module = lw.module(site.path)
        present = site_adapters(module)
        if lower_site is not None:
            fast = lower_site(lw, site, module, present)
            if fast is not None:
                return fast
        if lw.cached and kept is not None and site.kind in kept.kinds:
            return kept.rewrite(lw, site)
        return plain(lw, site, module, present)

    def parts(model, site: Site, module: nn.Module, adapter: str, dtype, alone: bool) -> Optional[SiteParts]:
        if sampled is not None and sampled(module, adapter):
            return None
        factors = None if delta_factors is None else delta_factors(model, site, module, adapter)
        down = up = dense = None
        if factors:
            down, up = factors[0].to(dtype), factors[1].to(dtype).t()
        elif factors is None:
            dense = delta_weight(model, site, module, adapter)
            dense = (dense.t() if site.fan_in_fan_out else dense).to(dtype)
        bias = None if delta_bias is None else delta_bias(model, site, module, adapter)
        return SiteParts(None, down, up, dense, None if bias is None else bias.to(dtype))

    def fold(gm, site, module, adapter, weight, bias, sign):
        bias_change = delta_bias(gm, site, module, adapter) if delta_bias is not None else None
        if bias_change is not None:
            if bias is None:
                raise RuntimeError(f"Cannot merge {name} adapter {adapter!r} into {site.path}: it changes the layer's bias "
                                   "and the layer has none. Keep it unmerged.")
            bias = bias + sign * bias_change.to(bias.dtype)
        return weight + sign * delta_weight(gm, site, module, adapter).to(weight.dtype), bias

    # generation graphs read each linear site's deltas from what prepare_call keeps (the method's ΔW); a
    # method lowering sites its own way (LoRA) keeps what it needs itself, except where kept_where says
    readable = delta_weight is not None or site_parts is not None
    kept = None if not readable or (lower_site is not None and kept_where is None) else _KeptSites(
        name, site_adapters, _gates_of(gates)[1], site_parts or parts, plain, where=kept_where, kinds=kinds)
    if kept is not None:
        _kept_hooks(fields, kept)
    rule = site_rule(name, lambda site, module: bool(site_adapters(module)), rewrite, phase=phase)
    return _site_method(name=name, config_type=config_type, create=create, kinds=kinds, containers=containers,
                        gates=gates, default_targets=default_targets, heads=heads, adapters_at=adapters_at,
                        rules=(rule,), fold=fold, **fields)


def _kept_hooks(fields: dict, kept) -> None:
    """A form's kept-per-call hooks, after the method's own ``lowered`` and ``prepare_call`` if it has any."""
    fields["lowered"] = chained(fields.get("lowered"), kept.lowered)
    fields["prepare_call"] = chained(fields.get("prepare_call"), kept.prepare_call)


def chained(first: Optional[Callable], second: Callable) -> Callable:
    """A hook running ``first`` (a method's own, if any), then ``second`` (a form's, or a wrapped method's)."""
    if first is None:
        return second

    def both(*args):
        first(*args)
        second(*args)

    return both


class GenerationLayout(NamedTuple):
    """What a generation graph's node reads of one linear site of a method when it runs (set by ``lowered``):
    its adapters, where prepared tensors go, and what computing them needs."""

    names: tuple[str, ...]  # its adapters
    positions: tuple[int, ...]  # theirs in the gates (and in a mixed batch's index)
    site: Site  # its site in the model's graph (the path from the model)
    # the transformed model, where a method reads state kept there (VeRA's projections): a weak reference, so
    # that copying a submodule does not copy the whole model (a copy of the model is lowered again: its own)
    model: weakref.ref
    places: list  # kept_places
    programs: dict  # "dense" / "mixed" (and "… input") -> the plain lowering as programs (_KeptSites.programs)


class SiteParts(NamedTuple):
    """One adapter at one linear site as a generation graph applies it in eval: ``y ← k ⊙ y + B (A x) + D x +
    b`` (each part None where it has none): ``k`` (out,), ``A`` (r, in), ``B`` given as ``up`` (r, out), ``D``
    (out, in), ``b`` (out,), with the adapter's scale and without its gate. A method whose site runs its op
    on a mapped input (``weight_map(maps_input=True)``) may also give ``Q`` as ``rotation`` (n, b, b): the op
    then reads ``x Q``, Q block-diagonal (n blocks of b × b; a dense Q is one block), while A and D read x.
    ``turn`` (out,) and ``partner`` (out,) indices mix output features in pairs: ``+ t ⊙ y[partner]`` (RoAd;
    one such adapter at a site: two chain). ``call`` (a function, its tensors) adds ``function(x, *tensors)``,
    traced in the generation graph (Lily: its router is not linear in x; not in mixed graphs)."""

    k: Optional[torch.Tensor] = None
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    dense: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    rotation: Optional[torch.Tensor] = None
    turn: Optional[torch.Tensor] = None
    partner: Optional[torch.Tensor] = None
    call: Optional[tuple] = None


class _Composed(NamedTuple):
    """What a dense generation graph reads of one site (:meth:`_KeptSites.composed`): the active adapters'
    parts composed, ``calls`` a list of (function, tensors, scale)."""

    k: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    up: Optional[torch.Tensor]
    dense: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    rotation: Optional[torch.Tensor]
    turn: Optional[torch.Tensor]
    partner: Optional[torch.Tensor]
    calls: list
    out_features: int


class _Stacked(NamedTuple):
    """What a mixed generation graph reads of one site (:meth:`_KeptSites.stacked`): every adapter's parts
    stacked (S + 1, …), and each global adapter index's slot (``lookup``)."""

    k: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    up: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    turn: Optional[torch.Tensor]
    rotation: Optional[torch.Tensor]
    partner: Optional[torch.Tensor]
    lookup: torch.Tensor
    out_features: int


class _KeptSites:
    """A site method in generation graphs (those reading a KV cache): one node per linear site reads, in a
    prepared call in eval mode, what ``prepare_call`` kept for it once per ``generate`` call, so that the
    graph's code names no adapter and one loaded between compiled generate calls does not recompile the
    decode step. The method gives each adapter as :class:`SiteParts` (``parts(model, site, module, adapter,
    dtype, alone)``, ``alone``: whether it is the only adapter the site applies, so that adapters chaining
    through the weight (HRA's reflections, MiSS's bat) can give a form that composes, or None; None too where
    parts cannot say it: an eval output that is random, PVeRA's ``sample_at_inference``). Dense graphs: the
    active adapters composed in order into one ``K ⊙ y + [B_1 …](A_1; …] x) + D x + b`` (low-rank factors
    side by side); mixed graphs (``adapter_names``): every adapter's parts stacked with a slot for none,
    each sample reading its own (not where an adapter has a dense ``D``: a stack would hold a weight per
    adapter). Otherwise (eager mixed calls, autograd, training: dropout and the methods' own randomness)
    the node runs the site as the plain lowering computes it (``lower(lw, site, module, adapters)``, built
    into ``GenerationLayout.programs``). With ``maps_input`` (a lowering running the op on a mapped input,
    the orthogonal family's) a first node maps the op's input (``SiteParts.rotation``, or the lowering's
    part before the op) and the graph's own op runs between the two nodes."""

    def __init__(self, name, adapters_at, gate_of, parts: Callable, lower: Callable,
                 where: Optional[Callable] = None, maps_input: bool = False, kinds=("linear",)):
        self.name = name
        self.maps_input = maps_input
        self.kinds = kinds  # the site kinds its generation graphs read this way (parts: linear sites only)
        self.layout_key = f"_fxpeft_{name}_generation"  # site __dict__: GenerationLayout
        self.programs_key = f"_fxpeft_{name}_programs"  # site __dict__: (what program() read, the programs)
        self.kept_name = f"_fxpeft_{name}_parts"  # a KeptTensors child of every lowering root (kept_roots)
        self.adapters_at, self.gate_of, self.parts, self.lower = adapters_at, gate_of, parts, lower
        self.where = where  # (site, module, adapters) -> whether the site's generation graphs take this path
        # what the graphs call: functions (not bound methods) with the form's state
        self.dense = functools.update_wrapper(functools.partial(_dense_site, self), _dense_site)
        self.mixed = functools.update_wrapper(functools.partial(_mixed_site, self), _mixed_site)
        self.dense_input = functools.update_wrapper(functools.partial(_dense_input, self), _dense_input)
        self.mixed_input = functools.update_wrapper(functools.partial(_mixed_input, self), _mixed_input)

    def rewrite(self, lw: Lowering, site: Site):
        if self.kept_name not in lw.root._modules:
            lw.root.add_module(self.kept_name, KeptTensors())
        dtype = adapter_dtype(site_weight(lw.root, site))
        state = (lw.attr(site.path), lw.attr(self.kept_name), site.path, dtype, *([lw.sample_index] * lw.mixed))
        x = site.input
        if self.maps_input and site.kind == "linear":  # (an embedding's is the token ids)
            lw.replace_op(site, input=lw.call(self.mixed_input if lw.mixed else self.dense_input, x, *state))
        return lw.call(self.mixed if lw.mixed else self.dense, x, site.output, *state)

    def lowered(self, gm) -> None:
        """Each linear site's GenerationLayout, once the model has a generation graph (a model that never
        generates builds no programs)."""
        roots, sites, order, registry = None, None, list(gm.peft_config), registry_of(gm)
        generates = any(reads_cache(signature) for signature in gm._fxpeft_signatures.values())
        for key in (self.kept_name, (self.kept_name, "step", False), (self.kept_name, "step", True)):
            gm._fxpeft_memo.pop(key, None)  # prepared before these layouts (a generation graph captured just now)
        for path, module in registry.base_modules(gm):
            names = tuple(self.adapters_at(module)) if generates else ()
            if names and sites is None:
                sites = sites_by_path(gm)
            site = sites.get(path) if names else None
            if site is None or site.kind not in self.kinds or (
                    self.where is not None and not self.where(site, module, names)):
                module.__dict__.pop(self.layout_key, None)
                module.__dict__.pop(self.programs_key, None)
                continue
            positions = tuple(order.index(a) for a in names)
            # what the lowering bakes in: the adapters (a gate is new when its adapter is: compared as the
            # object, not its id, which a new one may reuse), positions, dtypes
            key = (tuple(zip(names, positions, (self.gate_of(module, a) for a in names))), site_weight(gm, site).dtype)
            built = module.__dict__.get(self.programs_key)
            programs = built[1] if built is not None and built[0] == key else {
                key: program for mixed in (False, True)
                for key, program in self.programs(gm, registry, order, site, module, names, mixed).items()}
            module.__dict__[self.programs_key] = (key, programs)
            roots = roots or kept_roots(gm, self.kept_name)  # holders only where a site has adapters
            places = kept_places(roots, self.kept_name, path)
            for holder, key in places:
                holder.__dict__["sites"][key] = module
            module.__dict__[self.layout_key] = GenerationLayout(names, positions, site, weakref.ref(gm), places, programs)

    def programs(self, gm, registry, order, site: Site, module: nn.Module, names, mixed: bool) -> dict:
        """The site's plain lowering (as in a graph without a cache) as small programs: "dense" / "mixed" →
        ``program(model, [index,] x, y)``, the site's output with its adapters applied, from the op's input x
        and output y (a mixed one takes each sample's adapter index first); where the lowering runs the op on
        a mapped input, also "dense input" / "mixed input" → ``program(model, [index,] x)``, that input: the
        lowering is split at the op, which the generation graph runs between the two."""
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        op = graph.call_function(_op_stand_in, (x,))
        end = graph.output(None)
        lw = Lowering(graph, gm, registry, mixed, order)
        lw._start = op  # gates are read after the inputs
        lowered = dataclasses.replace(site, node=op, input=x, output=op)
        with graph.inserting_before(end):
            end.args = (self.lower(lw, lowered, module, list(names)),)
        inputs = {lw.sample_index: "fxpeft_adapter_index"} if mixed else {}
        inputs[x] = "x"
        which = "mixed" if mixed else "dense"
        programs = {which: _program(graph, {**inputs, lowered.node: "y"}, end.args[0])}
        if lowered.node is not op:  # replace_op: the op on a mapped input
            if not self.maps_input:
                raise NotImplementedError(
                    f"{self.name}'s lower_site runs the op at {site.path} on another input (replace_op): "
                    "weight_map(maps_input=True) says so, and the generation graph then runs the op between the "
                    "mapped input and the output.")
            programs[f"{which} input"] = _program(graph, inputs, lowered.input)
        elif self.maps_input:
            programs[f"{which} input"] = _program(graph, inputs, x)
        return programs

    def prepare_call(self, gm, mixed: bool, cached: bool, compiled: bool) -> None:
        """Before a generation step without autograd: each site's kept tensors for the graph the call runs,
        once per ``generate`` call (``generation.generate_step``) and per other call."""
        if not cached:
            return
        step = generate_step()
        if step is not None and gm._fxpeft_memo.get((self.kept_name, "step", mixed)) == step:
            return
        sites = gm._fxpeft_memo.get(self.kept_name)
        if sites is None:
            sites = gm._fxpeft_memo[self.kept_name] = [module for _, module in registry_of(gm).base_modules(gm)
                                                       if self.layout_key in module.__dict__]
        if not sites:  # e.g. LoRA's trainable tokens, where no adapter has rows
            return
        gates = gm._buffers["_fxpeft_gates"]
        active = gates.tolist()  # one host read: adapters switched off are left out
        with torch.no_grad():
            for module in sites:
                layout = module.__dict__[self.layout_key]
                if layout.site.kind != "linear" or any(is_sharded(p) for p in module.parameters()):
                    kept = None  # parts say linear sites only; FSDP2, outside the block's forward: afresh
                else:
                    kept = self.stacked(module, layout) if mixed else self.composed(module, layout, gates, active)
                for holder, key in layout.places:
                    holder.__dict__["tensors"][key, mixed] = kept
        gm._fxpeft_memo[self.kept_name, "step", mixed] = step

    def _features(self, layout: GenerationLayout):
        """(adapter dtype, in features, out features) of the layout's site."""
        weight = site_weight(layout.model(), layout.site)
        ins, outs = weight.shape[-1], weight.shape[0]
        return adapter_dtype(weight), *((outs, ins) if layout.site.fan_in_fan_out else (ins, outs))

    def composed(self, module: nn.Module, layout: GenerationLayout, gates: torch.Tensor, active: list):
        """The active adapters composed in order, each gated, in the dtype the graph computes them in (the
        site's adapter dtype); None where one gives no parts."""
        dtype, _, out_features = self._features(layout)
        k, downs, ups, dense, bias, rotation, turn, partner, calls = None, [], [], None, None, None, None, None, []
        acting = [(adapter, position) for adapter, position in zip(layout.names, layout.positions)
                  if active[position] and not self.gate_of(module, adapter).merged]
        for adapter, position in acting:
            parts = self.parts(layout.model(), layout.site, module, adapter, dtype, len(acting) == 1)
            if parts is None:
                return None
            if parts.turn is not None and (turn is not None or k is not None or downs or dense is not None
                                           or bias is not None):  # t ⊙ y[partner] reads the op's own output
                return None
            g = gates[position].to(dtype)
            if parts.k is not None:  # what came before is scaled too: y ← k ⊙ y + …
                step = (parts.k - 1) * g + 1
                k = step if k is None else k * step
                ups = [up * step for up in ups]
                dense = None if dense is None else dense * step.unsqueeze(-1)
                bias = None if bias is None else bias * step
                turn = None if turn is None else turn * step
                calls = [(function, tensors, scale * step) for function, tensors, scale in calls]
            if parts.turn is not None:
                turn, partner = parts.turn * g, parts.partner
            if parts.call is not None:  # copies marked dynamic: an adapter loaded later may be shaped otherwise
                function, tensors = parts.call
                calls.append((function, tuple(_dynamic_all(t.clone()) for t in tensors), g))
            if parts.down is not None:
                downs.append(parts.down)
                ups.append(parts.up * g)
            if parts.dense is not None:
                dense = parts.dense * g if dense is None else dense + parts.dense * g
            if parts.bias is not None:
                bias = parts.bias * g if bias is None else bias + parts.bias * g
            if parts.rotation is not None:  # x Q_n ⋯ Q_1: the op's input meets the last adapter's Q first
                q = toward_identity(parts.rotation, g)
                rotation = q if rotation is None else _blocks_product(q, rotation)
        down = up = None
        if downs:  # copies, not views: dynamo guards a view's base too; the rank is dynamic
            down, up = _dynamic(torch.cat(downs), 0), _dynamic(torch.cat(ups), 0)
        if rotation is not None:  # how an adapter loaded later blocks its Q may differ
            rotation = _dynamic_all(rotation.clone())
        return _Composed(k, down, up, dense, bias, rotation, turn, partner, calls, out_features)

    def stacked(self, module: nn.Module, layout: GenerationLayout):
        """Every adapter's parts stacked (S + 1, …) for the mixed graph, with a last slot for none (ranks
        padded with zeros, rotations the identity, dense where adapters' blocks differ), and each global
        adapter index's slot; None where an adapter gives no parts, a dense ``D`` or a ``call``."""
        dtype, in_features, out_features = self._features(layout)
        every = [None if self.gate_of(module, adapter).merged else  # merged: no delta (not mixed anyway)
                 self.parts(layout.model(), layout.site, module, adapter, dtype, True) or False
                 for adapter in layout.names]
        if any(parts is False or (parts is not None and (parts.dense is not None or parts.call is not None))
               for parts in every):
            return None
        every = [parts or SiteParts() for parts in every]
        rank = max((parts.down.shape[0] for parts in every if parts.down is not None), default=0)
        stacks = []
        for field, shape, empty in [("k", (out_features,), 1.0), ("down", (rank, in_features), 0.0),
                                    ("up", (rank, out_features), 0.0), ("bias", (out_features,), 0.0),
                                    ("turn", (out_features,), 0.0)]:
            present = [getattr(parts, field) for parts in every if getattr(parts, field) is not None]
            stack = None
            if present:
                stack = present[0].new_full((len(every) + 1, *shape), empty)
                for slot, parts in enumerate(every):
                    part = getattr(parts, field)
                    if part is not None:
                        stack[slot, :part.shape[0]] = part
                stack = _dynamic(_dynamic(stack, 0), 1) if field in ("down", "up") else _dynamic(stack, 0)
            stacks.append(stack)
        stacks.append(_stacked_rotations([parts.rotation for parts in every]))
        device = site_weight(layout.model(), layout.site).device
        partners = None
        if any(parts.partner is not None for parts in every):  # a slot without: itself, times a zero turn
            partners = torch.arange(out_features, device=device).repeat(len(every) + 1, 1)
            for slot, parts in enumerate(every):
                if parts.partner is not None:
                    partners[slot] = parts.partner
            partners = _dynamic(partners, 0)
        stacks.append(partners)
        return _Stacked(*stacks, _dynamic(slot_lookup(layout.positions, device), 0), out_features)


def toward_identity(q: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``I + g (Q - I)`` for square matrices or blocks (…, n, n) and a 0-dim gate: Q where the adapter acts,
    the identity where it does not (``v (I + g (Q - I))`` is ``v + g (v Q - v)``: the small matrix gated
    instead of the activations)."""
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return eye + g.to(q.dtype) * (q - eye)


def _dense_blocks(q: torch.Tensor) -> torch.Tensor:
    """Blocks (n, b, b) as one dense block (1, n b, n b)."""
    return q if q.shape[0] == 1 else torch.block_diag(*q.unbind(0)).unsqueeze(0)


def _blocks_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A B`` of block-diagonal matrices, block by block where their blocks agree, else dense."""
    if a.shape != b.shape:
        a, b = _dense_blocks(a), _dense_blocks(b)
    return torch.matmul(a, b)


def _stacked_rotations(rotations: list) -> Optional[torch.Tensor]:
    """Each adapter's Q stacked (S + 1, n, b, b), the identity for an adapter without one and the last
    slot (all dense (S + 1, 1, d, d) where their blocks differ); None where none has a Q."""
    present = [q for q in rotations if q is not None]
    if not present:
        return None
    if any(q.shape != present[0].shape for q in present):
        rotations = [None if q is None else _dense_blocks(q) for q in rotations]
        present = [q for q in rotations if q is not None]
    n, b = present[0].shape[:2]
    stack = torch.eye(b, device=present[0].device, dtype=present[0].dtype).repeat(len(rotations) + 1, n, 1, 1)
    for slot, q in enumerate(rotations):
        if q is not None:
            stack[slot] = q
    return _dynamic_all(stack)


def _dynamic_all(tensor: torch.Tensor) -> torch.Tensor:
    """Every size of a kept tensor dynamic (its shapes come from the adapters loaded)."""
    for dim in range(tensor.dim()):
        _dynamic(tensor, dim)
    return tensor


def _dynamic(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """A size adapters loaded later change (how many, the largest rank): dynamic from the first compile."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _kept(module: nn.Module, holder: nn.Module, key: str, mixed: bool):
    """What ``prepare_call`` kept for the site, where this call may read it (a prepared call in eval mode)."""
    if torch.is_grad_enabled() or not call_prepared() or module.training:
        return None
    return holder.__dict__["tensors"].get((key, mixed))


def _dense_site(form: _KeptSites, x: torch.Tensor, y: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                dtype: torch.dtype) -> torch.Tensor:
    """A dense generation graph's output at one linear site (see :class:`_KeptSites`)."""
    kept = _kept(module, holder, key, False)
    if kept is None:
        return _run_program(form, module, holder, key, "dense", x, y)
    h = x.to(dtype)
    delta = _summed([
        torch.matmul(torch.nn.functional.linear(h, kept.down), kept.up) if kept.down is not None else None,
        torch.nn.functional.linear(h, kept.dense) if kept.dense is not None else None, kept.bias,
        y.to(dtype).index_select(-1, kept.partner) * kept.turn if kept.turn is not None else None,
        *(function(h, *tensors) * scale for function, tensors, scale in kept.calls)])
    return _applied(y, kept.k, delta, dtype)


def _mixed_site(form: _KeptSites, x: torch.Tensor, y: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                dtype: torch.dtype, index: torch.Tensor) -> torch.Tensor:
    """A mixed generation graph's output at one linear site: each sample's adapter's (see :class:`_KeptSites`)."""
    kept = _kept(module, holder, key, True)
    if kept is None:
        return _run_program(form, module, holder, key, "mixed", index, x, y)
    k, down, up, bias, turn, partner = kept.k, kept.down, kept.up, kept.bias, kept.turn, kept.partner
    slots, out_features = _row_slots(kept.lookup, index, x), kept.out_features
    h = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1])  # (rows, tokens, in)
    rows = y.reshape(y.shape[0], -1, out_features)
    delta = _summed([
        torch.gather(rows.to(dtype), -1, partner.index_select(0, slots).unsqueeze(1).expand(rows.shape))
        * turn.index_select(0, slots).unsqueeze(1) if turn is not None else None,
        torch.bmm(torch.bmm(h, down.index_select(0, slots).transpose(1, 2)), up.index_select(0, slots))
        if down is not None else None,
        bias.index_select(0, slots).unsqueeze(1) if bias is not None else None])
    new = _applied(rows, None if k is None else k.index_select(0, slots).unsqueeze(1), delta, dtype)
    return new.reshape(y.shape)


def _dense_input(form: _KeptSites, x: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """A dense generation graph's input to the op at one linear site of a ``maps_input`` method: ``x Q``."""
    kept = _kept(module, holder, key, False)
    if kept is None:
        return _run_program(form, module, holder, key, "dense input", x)
    rotation = kept.rotation
    if rotation is None:
        return x
    n, b = rotation.shape[0], rotation.shape[1]
    blocks = x.to(dtype).reshape(*x.shape[:-1], n, b)
    return torch.einsum("...nb,nbc->...nc", blocks, rotation).reshape(x.shape).to(x.dtype)


def _mixed_input(form: _KeptSites, x: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                 dtype: torch.dtype, index: torch.Tensor) -> torch.Tensor:
    """A mixed generation graph's input to the op at one linear site of a ``maps_input`` method: each
    sample's ``x Q``, its adapter's Q."""
    kept = _kept(module, holder, key, True)
    if kept is None:
        return _run_program(form, module, holder, key, "mixed input", index, x)
    rotation, lookup = kept.rotation, kept.lookup
    if rotation is None:
        return x
    n, b = rotation.shape[1], rotation.shape[2]
    rows = rotation.index_select(0, _row_slots(lookup, index, x))  # (rows, n, b, b)
    blocks = x.to(dtype).reshape(x.shape[0], -1, n, b)  # (rows, tokens, n, b)
    return torch.einsum("rtnb,rnbc->rtnc", blocks, rows).reshape(x.shape).to(x.dtype)


def _run_program(form: _KeptSites, module: nn.Module, holder: nn.Module, key: str, which: str, *inputs: torch.Tensor):
    """The site's plain lowering (``GenerationLayout.programs[which]``), where nothing kept applies. Traced
    by torch.compile without autograd, it is the opaque op ``fxpeft::site_program``: the compiled graph
    names no adapter, so loading one (or a mixed step of dense-ΔW adapters) does not recompile it; with
    autograd dynamo traces the program itself, so that gradients reach the adapters."""
    if torch.compiler.is_compiling() and not torch.is_grad_enabled():  # the holder's token: blocks sharing a graph
        return torch.ops.fxpeft.site_program(holder.token, key, form.layout_key, which, list(inputs))
    layout = module.__dict__[form.layout_key]
    return layout.programs[which](layout.model(), *inputs)


@torch.library.custom_op("fxpeft::site_program", mutates_args=())
def _site_program(token: torch.Tensor, key: str, layout_key: str, which: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """One site's program, run eagerly from a compiled generation graph (see :func:`_run_program`): the site
    at ``key`` of the lowering root whose KeptTensors holds ``token``."""
    layout = KEPT_HOLDERS[int(token)].__dict__["sites"][key].__dict__[layout_key]
    out = layout.programs[which](layout.model(), *inputs)
    storages = {t.untyped_storage().data_ptr() for t in inputs}
    return out.clone() if out.untyped_storage().data_ptr() in storages else out  # an op's output owns its memory


@_site_program.register_fake
def _(token: torch.Tensor, key: str, layout_key: str, which: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    return torch.empty_like(inputs[-1])  # the output y's, or the input x's


def _row_slots(lookup: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's slot: rows are the batch, or the batch flattened with a later dimension (batch first)."""
    slots = slots_of(lookup, index)
    if x.shape[0] != slots.shape[0]:
        slots = slots.repeat_interleave(x.shape[0] // slots.shape[0])
    return slots


def _no_parts(*args) -> None:
    """A method giving no :class:`SiteParts`: its generation graphs run its programs."""
    return None


def _op_stand_in(x: torch.Tensor) -> torch.Tensor:
    """The site's op in a program's lowering: the programs are split at it, never run."""
    raise AssertionError("the site's op stands in a lowering only")


def _program(graph: torch.fx.Graph, inputs: dict, out: torch.fx.Node) -> Callable:
    """``program(model, *inputs)``: the nodes of ``graph`` computing ``out`` from ``inputs`` (node -> the
    placeholder's name, in order), compiled to a function; nodes needing anything else are left out."""
    part, env = torch.fx.Graph(), {}
    for node, name in inputs.items():
        env[node] = part.placeholder(name)
    for node in graph.nodes:
        if node not in env and node.op not in ("placeholder", "output") and all(
                arg in env for arg in node.all_input_nodes):
            env[node] = part.node_copy(node, env.__getitem__)
    part.output(env[out])
    for node in reversed(part.nodes):  # what out does not need (random draws included: the other part's)
        if node.op != "placeholder" and node.op != "output" and not node.users:
            part.erase_node(node)
    code = part.python_code(root_module="self")
    return _forward_from_src(code.src, code.globals, {})


def _applied(y: torch.Tensor, k: Optional[torch.Tensor], delta: Optional[torch.Tensor], dtype) -> torch.Tensor:
    """``k ⊙ y + delta`` (computed in ``dtype``, returned in ``y``'s), either part maybe None."""
    if k is None:
        return y if delta is None else y + delta.to(y.dtype)
    scaled = y.to(dtype) * k
    return (scaled if delta is None else scaled + delta).to(y.dtype)


def _summed(terms):
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


def slot_lookup(positions: tuple, device) -> torch.Tensor:
    """Mixed batches over stacked adapters: global adapter index -> local slot (``len(positions)``, the empty
    slot, for any other index up to one past the largest position; :func:`slots_of` clamps those beyond)."""
    none = len(positions)
    lookup = torch.full((max(positions) + 2,), none, dtype=torch.long, device=device)
    lookup[list(positions)] = torch.arange(none, device=device)
    return lookup


def slots_of(lookup: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Each sample's slot ("__base__", past every adapter: the empty one)."""
    return lookup[index.clamp(max=lookup.shape[0] - 1)]


def masked_samples(delta: torch.Tensor, index: torch.Tensor, slot: int) -> torch.Tensor:
    """Mixed batches: an adapter's delta, kept only for the samples that asked for it."""
    return delta * samples_of(index, slot, delta).to(delta.dtype)


# ----------------------------------------------------------------------------- scaling


def scaling(*, name: str, config_type: type, create: Callable, vector: Callable, scales_input: Callable,
            containers: tuple[str, ...], gates: str, kinds=("linear", "conv"), default_targets: Optional[dict] = None,
            heads: Optional[Callable] = None, min_scale: float = 1e-6, **fields) -> Method:
    """A method multiplying a site's input or output by a learned vector, ``v`` per feature.

    ``vector(module, adapter)`` is the adapter's parameter (any shape holding one value per input
    or output feature); ``scales_input(module, adapter)`` says which side it scales. Several
    active adapters multiply; an inactive or merged one scales by 1 (``1 + g (v - 1)``, ``g`` its
    gate). Merging multiplies the weight's input or output axis (and an output-scaled site's
    bias); a vector entry below ``min_scale`` in magnitude refuses to merge, since unmerging
    divides by it.
    """
    adapters_at, gate_of = _gates_of(gates)
    layout_key = f"_fxpeft_{name}_layout"  # site __dict__: side (scales input) -> names, positions, kept at
    kept_name = f"_fxpeft_{name}_kept"  # a KeptTensors child of every lowering root (kept_roots)

    def factors(module: nn.Module, holder: nn.Module, key: str, gates: torch.Tensor, inputs: bool, dtype,
                index: Optional[torch.Tensor] = None):
        """A generation graph's per-feature factors at one side of a site, read when it runs, so that its
        code names no adapter (one loaded between compiled generate calls leaves it as it was): in a
        prepared call those ``prepare_call`` kept, else the product of the site's gated vectors. Mixed
        graphs (``index``: each sample's adapter): (batch, features), each sample's adapter's."""
        if not torch.is_grad_enabled() and call_prepared():
            kept = holder.__dict__["tensors"].get((key, index is not None))
            if kept is not None and index is None:
                return kept
            if kept is not None:
                stack, lookup = kept
                return stack.index_select(0, slots_of(lookup, index))
        return gated_product(module, gates, inputs, dtype, index)

    def gated_product(module: nn.Module, gates: torch.Tensor, inputs: bool, dtype, index=None):
        names, positions, *_ = module.__dict__[layout_key][inputs]
        total = None
        for adapter, position in zip(names, positions):
            v = vector(module, adapter).reshape(-1).to(dtype)
            on = gates[position] if index is None else (index == position).to(dtype).unsqueeze(1)
            gated = (v - 1) * (gate_of(module, adapter).value * on) + 1
            total = gated if total is None else total * gated
        return total

    def stacked(module: nn.Module, inputs: bool, dtype):
        """The mixed graph's factors: every adapter's gated vector stacked (S + 1, features) with a last slot
        of ones (no adapter), and each global adapter index's slot."""
        names, positions, *_ = module.__dict__[layout_key][inputs]
        rows = [(vector(module, a).reshape(-1).to(dtype) - 1) * gate_of(module, a).value.to(dtype) + 1 for a in names]
        stack = torch.stack([*rows, torch.ones_like(rows[0])])
        return _dynamic(stack, 0), _dynamic(slot_lookup(positions, stack.device), 0)

    def lowered(gm) -> None:
        """After every lowering: each site's layout: its adapters on each side, their positions in the gates,
        and where prepared factors go (:func:`kept_places`)."""
        roots = kept_roots(gm, kept_name)
        order = list(gm.peft_config)
        for path, module in registry_of(gm).base_modules(gm):
            adapters = adapters_at(module)
            if not adapters:
                module.__dict__.pop(layout_key, None)
                continue
            layout = {}
            for side in (True, False):
                names = tuple(a for a in adapters if scales_input(module, a) == side)
                if names:
                    label = "input" if side else "output"
                    layout[side] = (names, tuple(order.index(a) for a in names),
                                    [(holder, f"{key}:{label}") for holder, key in kept_places(roots, kept_name, path)])
            module.__dict__[layout_key] = layout

    def prepare_call(gm, mixed: bool, cached: bool, compiled: bool) -> None:
        """Before a generation step without autograd: each site's factors for the graph the call runs, once
        per ``generate`` call (``generation.generate_step``) and per other call."""
        if not cached:
            return
        step = generate_step()
        if step is not None and gm._fxpeft_memo.get((kept_name, "step", mixed)) == step:
            return
        sites = gm._fxpeft_memo.get(kept_name)
        if sites is None:
            sites = gm._fxpeft_memo[kept_name] = [module for _, module in registry_of(gm).base_modules(gm)
                                                  if module.__dict__.get(layout_key)]
        gates = gm._buffers["_fxpeft_gates"]
        with torch.no_grad():
            for module in sites:
                dtype = (getattr(module, "weight_spec", None) or module.weight).dtype  # after .to() too
                for side, (_, _, at) in module.__dict__[layout_key].items():
                    kept = stacked(module, side, dtype) if mixed else gated_product(module, gates, side, dtype)
                    for holder, key in at:
                        holder.__dict__["tensors"][key, mixed] = kept
        gm._fxpeft_memo[kept_name, "step", mixed] = step

    def per_feature(lw: Lowering, site: Site, module: nn.Module, adapters: list[str], dtype, inputs: bool):
        """The product of the adapters' gated vectors: (features,) in dense graphs, (batch, features)
        in mixed ones; a generation graph reads them when it runs (``factors``)."""
        if lw.cached:
            if kept_name not in lw.root._modules:
                lw.root.add_module(kept_name, KeptTensors())
            key = f"{site.path}:{'input' if inputs else 'output'}"
            return lw.call(factors, lw.attr(site.path), lw.attr(kept_name), key, lw.attr("_fxpeft_gates"), inputs,
                           dtype, lw.sample_index)
        total = None
        for adapter in adapters:
            v = lw.call(aten.reshape.default, lw.attr(_param_path(site, module, adapter)), [-1])
            v = lw.cast(v, dtype, vector(module, adapter).dtype)
            g = lw.attr(f"{site.path}.{gates}.{adapter}.value")
            if lw.mixed:
                g = lw.call(aten.mul.Tensor, g, lw.call(sample_mask, lw.sample_index, lw.adapter_order.index(adapter)))
                g = lw.call(aten.unsqueeze.default, g, 1)  # (batch, 1)
            else:
                g = lw.call(aten.mul.Tensor, g, lw.gate(adapter))
            gated = lw.call(aten.add.Tensor, lw.call(aten.mul.Tensor, lw.call(aten.sub.Tensor, v, 1), g), 1)
            total = gated if total is None else lw.call(aten.mul.Tensor, total, gated)
        return total

    def _param_path(site: Site, module: nn.Module, adapter: str) -> str:
        param = vector(module, adapter)
        return next(f"{site.path}.{n}" for n, p in module.named_parameters() if p is param)

    def scale(lw: Lowering, value, factors, channels_dim: int):
        """``value * factors`` with factors along ``channels_dim`` (last for linear, 1 for conv)."""
        if lw.mixed:  # (batch, F) -> broadcast over the middle dims
            return lw.call(aten.mul.Tensor, value, lw.call(broadcast_per_sample, factors, value, channels_dim))
        if channels_dim != -1:
            factors = lw.call(channel_view, factors, value, channels_dim)
        return lw.call(aten.mul.Tensor, value, factors)

    def rewrite_inputs(lw: Lowering, site: Site):
        module = lw.module(site.path)
        adapters = [a for a in adapters_at(module) if scales_input(module, a)]
        dtype = site_weight(lw.root, site).dtype
        channels = 1 if site.kind == "conv" else -1
        scaled = scale(lw, site.input, per_feature(lw, site, module, adapters, dtype, True), channels)
        return lw.replace_op(site, input=scaled)

    def rewrite_outputs(lw: Lowering, site: Site):
        module = lw.module(site.path)
        adapters = [a for a in adapters_at(module) if not scales_input(module, a)]
        dtype = site_weight(lw.root, site).dtype
        channels = 1 if site.kind == "conv" else -1
        return scale(lw, site.output, per_feature(lw, site, module, adapters, dtype, False), channels)

    def fold(gm, site, module, adapter, weight, bias, sign):
        v = vector(module, adapter).detach().reshape(-1).to(weight.dtype)
        if sign > 0 and bool((v.abs() < min_scale).any()):
            raise ValueError(f"Cannot merge {name} adapter {adapter!r} into {site.path}: its scaling vector has entries "
                             f"below {min_scale} in magnitude, and unmerging divides by them. Keep it unmerged.")
        factor = v if sign > 0 else 1.0 / v
        inputs = scales_input(module, adapter)
        axis = _weight_axis(site, inputs)
        shape = [1] * weight.dim()
        shape[axis] = -1
        weight = weight * factor.view(shape)
        if not inputs and bias is not None:
            bias = bias * factor.to(bias.dtype)
        return weight, bias

    rules = (site_rule(f"{name}_input", lambda s, m: any(scales_input(m, a) for a in adapters_at(m)),
                       rewrite_inputs, phase=30),
             site_rule(f"{name}_output", lambda s, m: any(not scales_input(m, a) for a in adapters_at(m)),
                       rewrite_outputs, phase=60))
    return _site_method(name=name, config_type=config_type, create=create, kinds=kinds, containers=containers,
                        gates=gates, default_targets=default_targets, heads=heads, adapters_at=None,
                        rules=rules, fold=fold, prepare_call=prepare_call, lowered=lowered, **fields)


def _weight_axis(site: Site, inputs: bool) -> int:
    """The axis of the site's stored weight holding its input (or output) features."""
    if site.kind == "linear" and site.fan_in_fan_out:  # Conv1D stores (in, out)
        return 0 if inputs else 1
    return 1 if inputs else 0


def sample_mask(index: torch.Tensor, slot: int) -> torch.Tensor:
    return (index == slot).to(torch.get_default_dtype())


def channel_view(factors: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """``factors`` (C,) shaped to multiply ``like`` along ``dim``."""
    shape = [1] * like.dim()
    shape[dim] = -1
    return factors.reshape(shape)


def broadcast_per_sample(factors: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Per-sample ``factors`` (B, C) shaped to multiply ``like`` (B, …) along ``dim``: rows may be the
    batch flattened with a later dimension, batch first (as :func:`samples_of`)."""
    if like.shape[0] != factors.shape[0]:
        factors = factors.repeat_interleave(like.shape[0] // factors.shape[0], dim=0)
    shape = [1] * like.dim()
    shape[0] = factors.shape[0]
    shape[dim] = factors.shape[1]
    return factors.reshape(shape).to(like.dtype)


# ----------------------------------------------------------------------------- weight map


def weight_map(*, name: str, config_type: type, create: Callable, lower_site: Callable, fold: Callable,
               containers: tuple[str, ...], gates: str, kinds=("linear",), default_targets: Optional[dict] = None,
               heads: Optional[Callable] = None, adapters_at: Optional[Callable] = None, phase: int = 40,
               site_parts: Optional[Callable] = None, maps_input: bool = False, kept_kinds=None,
               **fields) -> Method:
    """A method whose site computes with a function of its weight.

    ``lower_site(lw, site, module, adapters)`` inserts the site's new output (it may call
    ``lw.replace_op(site, weight=...)`` to run the op on the mapped weight, or compute the same
    thing cheaper); ``fold(gm, site, module, adapter, weight, bias, sign)`` folds the map into the
    float weight (sign 1) or unfolds it (-1), keeping on the gate's ``stash`` what unfolding needs.
    ``site_parts(model, site, module, adapter, dtype, alone)`` (optional) gives one adapter at a linear site
    in eval as :class:`SiteParts`: generation graphs then read them, kept once per ``generate`` call
    (:class:`_KeptSites`), and an adapter loaded between compiled generate calls does not recompile.
    Where the kept parts do not apply, generation graphs run ``lower_site`` as small programs from the
    op's input and output; a ``lower_site`` running the op on a mapped input (``replace_op(site,
    input=…)``: the orthogonal family) says so with ``maps_input``: the generation graph then maps the
    input in a node of its own (``SiteParts.rotation``, or the lowering's part before the op), runs the op
    on it, and applies the rest in a second node. ``kept_kinds``: the site kinds whose generation graphs
    read the adapters so (default: linear sites, where ``site_parts`` is given); on other kinds, and for a
    method without ``site_parts``, the programs always (a ``lower_site`` computing from the op's output).
    """
    site_adapters = adapters_at or _gates_of(gates)[0]

    def rewrite(lw: Lowering, site: Site):
        module = lw.module(site.path)
        if lw.cached and kept is not None and site.kind in kept.kinds:
            return kept.rewrite(lw, site)
        return lower_site(lw, site, module, site_adapters(module))

    kept_kinds = kept_kinds or (("linear",) if site_parts is not None else ())
    kept = None if not kept_kinds else _KeptSites(name, site_adapters, _gates_of(gates)[1], site_parts or _no_parts,
                                                  lower_site, maps_input=maps_input, kinds=kept_kinds)
    if kept is not None:
        _kept_hooks(fields, kept)
    rule = site_rule(name, lambda site, module: bool(site_adapters(module)), rewrite, phase=phase)
    return _site_method(name=name, config_type=config_type, create=create, kinds=kinds, containers=containers,
                        gates=gates, default_targets=default_targets, heads=heads, adapters_at=adapters_at,
                        rules=(rule,), fold=fold, **fields)
