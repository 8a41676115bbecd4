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
from typing import Callable, Optional

import torch
from torch import nn

# adapter_dtype: the passes take it from here
from .canonical import Site, adapter_dtype, site_weight, submodule  # noqa: F401
from .generation import KeptTensors, generate_step, kept_places, kept_roots
from .kept import KeptSites, SiteParts, dynamic, no_parts, slot_lookup, slots_of
from .registry import Method, call_prepared, registry_of, site_rule
from .rewrite import Lowering, samples_of
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
    (:class:`KeptSites`), so that a load between compiled generate calls does not recompile: conv and
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
    kept = None if not readable or (lower_site is not None and kept_where is None) else KeptSites(
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
        return dynamic(stack, 0), dynamic(slot_lookup(positions, stack.device), 0)

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
               site_parts: Optional[Callable] = None, maps: Optional[dict] = None, kept_kinds=None,
               **fields) -> Method:
    """A method whose site computes with a function of its weight.

    ``lower_site(lw, site, module, adapters)`` inserts the site's new output (it may call
    ``lw.replace_op(site, weight=...)`` to run the op on the mapped weight, or compute the same
    thing cheaper); ``fold(gm, site, module, adapter, weight, bias, sign)`` folds the map into the
    float weight (sign 1) or unfolds it (-1), keeping on the gate's ``stash`` what unfolding needs.
    ``site_parts(model, site, module, adapter, dtype, alone)`` (optional) gives one adapter at a linear site
    in eval as :class:`SiteParts`: generation graphs then read them, kept once per ``generate`` call
    (:class:`KeptSites`), and an adapter loaded between compiled generate calls does not recompile.
    Where the kept parts do not apply, generation graphs run ``lower_site`` as small programs from the
    op's input and output; a ``lower_site`` running the op on a mapped operand (``replace_op``: the
    orthogonal family) says which by site kind with ``maps``: "input" (``replace_op(site, input=…)``), the
    generation graph then maps the input in a node of its own (``SiteParts.rotation``, or the lowering's
    part before the op), runs the op on it, and applies the rest in a second node; "weight"
    (``replace_op(site, weight=…)``, the op's output being the site's), a node maps the weight and the
    graph's op runs on it (in mixed graphs, the lowering from the op's output). ``kept_kinds``: the site
    kinds whose generation graphs read the adapters so (default: linear sites, where ``site_parts`` is
    given); on other kinds, and for a method without ``site_parts``, the programs always (a ``lower_site``
    computing from the op's output).
    """
    site_adapters = adapters_at or _gates_of(gates)[0]

    def rewrite(lw: Lowering, site: Site):
        module = lw.module(site.path)
        if lw.cached and kept is not None and site.kind in kept.kinds:
            return kept.rewrite(lw, site)
        return lower_site(lw, site, module, site_adapters(module))

    kept_kinds = kept_kinds or (("linear",) if site_parts is not None else ())
    kept = None if not kept_kinds else KeptSites(name, site_adapters, _gates_of(gates)[1], site_parts or no_parts,
                                                  lower_site, maps=maps, kinds=kept_kinds)
    if kept is not None:
        _kept_hooks(fields, kept)
    rule = site_rule(name, lambda site, module: bool(site_adapters(module)), rewrite, phase=phase)
    return _site_method(name=name, config_type=config_type, create=create, kinds=kinds, containers=containers,
                        gates=gates, default_targets=default_targets, heads=heads, adapters_at=adapters_at,
                        rules=(rule,), fold=fold, **fields)
