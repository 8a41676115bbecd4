"""What generation graphs read of a site method's adapters when they run (:class:`KeptSites`).

A graph reading a KV cache (a decode step) must not name adapters in its code, or loading one between
compiled ``generate`` calls recompiles it. So each site's node reads, in a prepared call without autograd,
what ``prepare_call`` kept once per ``generate`` call: the active adapters' :class:`SiteParts` composed
(dense graphs) or stacked with a slot per adapter (mixed graphs, ``adapter_names``). Where parts do not
apply (autograd, training, conv and embedding sites, methods giving none), the node runs
the site's plain lowering as a small program (``GenerationLayout.programs``), from torch.compile without
autograd as the opaque op ``fxpeft::site_program``. The forms (fxpeft/forms.py) build one per method.
"""
from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.fx.graph_module import _forward_from_src

from .canonical import Site, adapter_dtype, is_sharded, site_weight
from .generation import KEPT_HOLDERS, KeptTensors, generate_step, kept_places, kept_roots, reads_cache
from .registry import call_prepared, registry_of
from .rewrite import Lowering
from .state import sites_by_path


class GenerationLayout(NamedTuple):
    """What a generation graph's node reads of one site of a method when it runs (set by ``lowered``):
    its adapters, where prepared tensors go, and what computing them needs."""

    names: tuple[str, ...]  # its adapters
    positions: tuple[int, ...]  # theirs in the gates (and in a mixed batch's index)
    site: Site  # its site in the model's graph (the path from the model)
    # the transformed model, where a method reads state kept there (VeRA's projections): a weak reference, so
    # that copying a submodule does not copy the whole model (a copy of the model is lowered again: its own)
    model: weakref.ref
    places: list  # kept_places
    programs: dict  # "dense" / "mixed" (and "… input", "dense weight") -> the plain lowering as programs (KeptSites.programs)

    def __deepcopy__(self, memo):
        """Shared, not copied: its site holds graph nodes, which do not copy, and a copied model's relower gives
        the copy's modules layouts of their own."""
        return self


class SiteParts(NamedTuple):
    """One adapter at one linear site as a generation graph applies it in eval: ``y ← k ⊙ y + B (A x) + D x +
    b`` (each part None where it has none): ``k`` (out,), ``A`` (r, in), ``B`` given as ``up`` (r, out), ``D``
    (out, in), ``b`` (out,), with the adapter's scale and without its gate. A method whose site runs its op
    on a mapped input (``weight_map(maps={"linear": "input"})``) may also give ``Q`` as ``rotation`` (n, b, b): the op
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


class _Kept(NamedTuple):
    """What a generation graph's node reads of one site, kept by ``prepare_call``: in a dense graph the active
    adapters' parts composed (:meth:`KeptSites.composed`; ``calls`` a list of (function, tensors, scale)), in a
    mixed graph every adapter's parts stacked (S + 1, …) with each global adapter index's slot in ``lookup``
    (:meth:`KeptSites.stacked`; no ``dense`` nor ``calls`` there)."""

    k: Optional[torch.Tensor]
    down: Optional[torch.Tensor]
    up: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    turn: Optional[torch.Tensor]
    rotation: Optional[torch.Tensor]
    partner: Optional[torch.Tensor]
    out_features: int
    dense: Optional[torch.Tensor] = None
    calls: tuple = ()
    lookup: Optional[torch.Tensor] = None


class KeptSites:
    """A site method in generation graphs (those reading a KV cache): one node per site of ``kinds`` reads, in a
    prepared call in eval mode, what ``prepare_call`` kept for it once per ``generate`` call, so that the
    graph's code names no adapter and one loaded between compiled generate calls does not recompile the
    decode step. The method gives each adapter as :class:`SiteParts` (``parts(model, site, module, adapter,
    dtype, alone)``, ``alone``: whether it is the only adapter the site applies, so that adapters chaining
    through the weight (HRA's reflections, MiSS's bat) can give a form that composes, or None; None too where
    parts cannot say it: an eval output that is random, PVeRA's ``sample_at_inference``). Dense graphs: the
    active adapters composed in order into one ``K ⊙ y + [B_1 …](A_1; …] x) + D x + b`` (low-rank factors
    side by side); mixed graphs (``adapter_names``): every adapter's parts stacked with a slot for none,
    each sample reading its own (not where an adapter has a dense ``D``: a stack would hold a weight per
    adapter). Parts describe linear sites only. Otherwise (conv and embedding sites,
    autograd, training: dropout and the methods' own randomness) the node runs the site as the plain
    lowering computes it (``lower(lw, site, module, adapters)``, built
    into ``GenerationLayout.programs``). ``maps`` (site kind -> "input" or "weight") names the kinds where
    the lowering runs the op on a mapped operand (the orthogonal family's: ``x Q`` at linear sites, ``W Q^T``
    at conv sites): "input", a first node maps the op's input (``SiteParts.rotation``, or the lowering's part
    before the op) and the graph's own op runs between the two nodes; "weight", in dense graphs a node maps
    the op's weight (the lowering's part before the op, whose output is the site's) and the graph's own op
    runs on it (mixed graphs: the lowering from the op's output, as for other kinds)."""

    def __init__(self, name, adapters_at, gate_of, parts: Callable, lower: Callable,
                 where: Optional[Callable] = None, maps: Optional[dict] = None, kinds=("linear",)):
        self.name = name
        self.maps = maps or {}
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
        self.dense_weight = functools.update_wrapper(functools.partial(_dense_weight, self), _dense_weight)

    def rewrite(self, lw: Lowering, site: Site):
        if self.kept_name not in lw.root._modules:
            lw.root.add_module(self.kept_name, KeptTensors())
        dtype = adapter_dtype(site_weight(lw.root, site))
        state = (lw.attr(site.path), lw.attr(self.kept_name), site.path, dtype, *([lw.sample_index] * lw.mixed))
        x, operand = site.input, self.maps.get(site.kind)
        if operand == "input":
            lw.replace_op(site, input=lw.call(self.mixed_input if lw.mixed else self.dense_input, x, *state))
        elif operand == "weight" and not lw.mixed:  # the op on the mapped weight is the site's output
            return lw.replace_op(site, weight=lw.call(self.dense_weight, site.weight_node, *state))
        return lw.call(self.mixed if lw.mixed else self.dense, x, site.output, *state)

    def lowered(self, gm) -> None:
        """Each site's GenerationLayout (sites of ``kinds``), once the model has a generation graph (a model
        that never generates builds no programs)."""
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
        and output y (a mixed one takes each sample's adapter index first). Where the lowering runs the op on
        a mapped operand (``maps``) it is split at the op, which the generation graph runs between the parts:
        also "dense input" / "mixed input" → ``program(model, [index,] x)``, the op's input, or "dense weight"
        → ``program(model, w)``, its weight (from the op's own weight ``w`` where the lowering reads that node;
        a lowering reading the weight itself leaves ``w`` to shape the opaque op's output)."""
        graph = torch.fx.Graph()
        x = graph.placeholder("x")
        op = _op_copy(graph, site, x)
        end = graph.output(None)
        lw = Lowering(graph, gm, registry, mixed, order)
        lw._start = op  # gates are read after the inputs
        lowered = dataclasses.replace(site, node=op, input=x, output=op)
        weight = lowered.weight_node
        position = op.args.index(weight) if weight in op.args else None
        with graph.inserting_before(end):
            end.args = (self.lower(lw, lowered, module, list(names)),)
        inputs = {lw.sample_index: "fxpeft_adapter_index"} if mixed else {}
        inputs[x] = "x"
        which = "mixed" if mixed else "dense"
        programs = {which: _program(graph, {**inputs, lowered.node: "y"}, end.args[0])}
        operand = self.maps.get(site.kind)
        if operand == "input":  # (x itself, where the lowering did not map it)
            programs[f"{which} input"] = _program(graph, inputs, lowered.input)
        elif operand == "weight" and not mixed and position is not None and end.args[0] is lowered.node:
            programs["dense weight"] = _program(graph, {weight: "w"}, lowered.node.args[position])
        elif lowered.node is not op or operand == "weight" and not mixed:
            raise NotImplementedError(
                f"{self.name}'s lower_site runs the op at {site.path} on another operand (replace_op): "
                f"weight_map(maps={{{site.kind!r}: 'input'}}) says so for a mapped input, and the generation "
                "graph then runs the op between the mapped input and the output; 'weight' for a mapped weight, "
                "the op's output being the site's.")
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
        if sites is None:  # parts say linear sites only: the others (and a method giving none) run programs
            sites = gm._fxpeft_memo[self.kept_name] = [] if self.parts is no_parts else [
                module for _, module in registry_of(gm).base_modules(gm)
                if self.layout_key in module.__dict__ and module.__dict__[self.layout_key].site.kind == "linear"]
        if not sites:  # nothing to keep: no host read of the gates
            return
        gates = gm._buffers["_fxpeft_gates"]
        active = gates.tolist()  # one host read: adapters switched off are left out
        with torch.no_grad():
            for module in sites:
                layout = module.__dict__[self.layout_key]
                if any(is_sharded(p) for p in module.parameters()):  # FSDP2, outside the block's forward: afresh
                    kept = None
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
            down, up = dynamic(torch.cat(downs), 0), dynamic(torch.cat(ups), 0)
        if rotation is not None:  # how an adapter loaded later blocks its Q may differ
            rotation = _dynamic_all(rotation.clone())
        return _Kept(k, down, up, bias, turn, rotation, partner, out_features, dense=dense, calls=calls)

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
                stack = dynamic(dynamic(stack, 0), 1) if field in ("down", "up") else dynamic(stack, 0)
            stacks.append(stack)
        stacks.append(_stacked_rotations([parts.rotation for parts in every]))
        device = site_weight(layout.model(), layout.site).device
        partners = None
        if any(parts.partner is not None for parts in every):  # a slot without: itself, times a zero turn
            partners = torch.arange(out_features, device=device).repeat(len(every) + 1, 1)
            for slot, parts in enumerate(every):
                if parts.partner is not None:
                    partners[slot] = parts.partner
            partners = dynamic(partners, 0)
        stacks.append(partners)
        return _Kept(*stacks, out_features, lookup=dynamic(slot_lookup(layout.positions, device), 0))


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
        dynamic(tensor, dim)
    return tensor


def dynamic(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """A size adapters loaded later change (how many, the largest rank): dynamic from the first compile."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)
    return tensor


def _kept(module: nn.Module, holder: nn.Module, key: str, mixed: bool):
    """What ``prepare_call`` kept for the site, where this call may read it (a prepared call in eval mode)."""
    if torch.is_grad_enabled() or not call_prepared() or module.training:
        return None
    return holder.__dict__["tensors"].get((key, mixed))


def _dense_site(form: KeptSites, x: torch.Tensor, y: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                dtype: torch.dtype) -> torch.Tensor:
    """A dense generation graph's output at one site (see :class:`KeptSites`)."""
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


def _mixed_site(form: KeptSites, x: torch.Tensor, y: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                dtype: torch.dtype, index: torch.Tensor) -> torch.Tensor:
    """A mixed generation graph's output at one site: each sample's adapter's (see :class:`KeptSites`)."""
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


def _dense_input(form: KeptSites, x: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                 dtype: torch.dtype) -> torch.Tensor:
    """A dense generation graph's input to the op at one linear site whose lowering maps it (``maps``): ``x Q``."""
    kept = _kept(module, holder, key, False)
    if kept is None:
        return _run_program(form, module, holder, key, "dense input", x)
    rotation = kept.rotation
    if rotation is None:
        return x
    n, b = rotation.shape[0], rotation.shape[1]
    blocks = x.to(dtype).reshape(*x.shape[:-1], n, b)
    return torch.einsum("...nb,nbc->...nc", blocks, rotation).reshape(x.shape).to(x.dtype)


def _dense_weight(form: KeptSites, w: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                  dtype: torch.dtype) -> torch.Tensor:
    """A dense generation graph's weight for the op at one site whose lowering maps it (``maps``): always
    its program (no parts describe a weight)."""
    return _run_program(form, module, holder, key, "dense weight", w)


def _mixed_input(form: KeptSites, x: torch.Tensor, module: nn.Module, holder: nn.Module, key: str,
                 dtype: torch.dtype, index: torch.Tensor) -> torch.Tensor:
    """A mixed generation graph's input to the op at one linear site whose lowering maps it (``maps``): each
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


def _run_program(form: KeptSites, module: nn.Module, holder: nn.Module, key: str, which: str, *inputs: torch.Tensor):
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


def no_parts(*args) -> None:
    """A method giving no :class:`SiteParts`: its generation graphs run its programs."""
    return None


def _op_copy(graph: torch.fx.Graph, site: Site, x: torch.fx.Node) -> torch.fx.Node:
    """The site's op in a program's lowering: a copy reading ``x`` and the model's attributes (a mixed
    graph's lowering may run it on other weights: a conv's per adapter), or a stand-in where it reads other
    nodes. Programs take its output as their input y, never computing it for that."""
    env = {site.input: x}
    for arg in site.node.all_input_nodes:
        if arg is not site.input:
            if arg.op != "get_attr":
                return graph.call_function(_op_stand_in, (x,))
            env[arg] = graph.get_attr(arg.target)
    return graph.node_copy(site.node, env.__getitem__)


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
