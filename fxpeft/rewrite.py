"""The rewrite driver: rules are data (fxpeft/registry.py), one function applies them all.

A rule's ``match`` finds places in a canonical graph (sites, or any node pattern) and its
``rewrite`` inserts nodes through the :class:`Lowering` builders. Rules run by ``phase`` (whole
modules swapped, then the sequence, then site inputs and weights, then output deltas, then
output scales), so methods stack without knowing of each other.

:func:`lower` turns a canonical graph plus the adapter state in the module tree into the
executable graph. Any change of adapter state re-lowers from the canonical graph, so a graph
never accumulates stale rewrites, and its structure depends on which adapters *exist*, not on
which are active (activity is buffer data the graph reads).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx
from torch import nn

from .canonical import Site, find_sites, submodule

aten = torch.ops.aten


class Lowering:
    """One graph being lowered: the graph, the module tree it reads from, and its sites."""

    def __init__(self, graph: torch.fx.Graph, root: nn.Module, registry, mixed: bool = False,
                 adapter_order: Optional[list[str]] = None, cached: bool = False, call_inputs: tuple[str, ...] = ()):
        self.graph = graph
        self.cached = cached  # the graph reads and writes a KV cache (generation; see Method.prefill_cache)
        self.root = root  # the module the graph reads: the result, or one of its blocks
        self.registry = registry
        self.sites = find_sites(graph, root, registry)
        self.tag: dict[str, str] = {}  # stamped on every inserted node's meta (for inspection)
        self.adapter_order = list(getattr(root, "peft_config", {}) if adapter_order is None else adapter_order)
        self.mixed = mixed  # per-sample adapters: the graph takes an index tensor as first input
        self.sample_index = None
        if mixed:
            with graph.inserting_before(next(iter(graph.nodes))):
                self.sample_index = graph.placeholder("fxpeft_adapter_index")
        self._call_inputs: dict[str, torch.fx.Node] = {}
        for name in call_inputs:
            self.call_input(name)
        self._start = next(iter(graph.nodes))  # gates are read at the top, before any use
        self._gates: dict[str, torch.fx.Node] = {}  # keyed by adapter name: any string is a valid name
        self._slots: Optional[torch.fx.Node] = None

    def call_input(self, name: str) -> torch.fx.Node:
        """The graph input holding the per-call input ``name`` (``Method.call_inputs``: PEFT's ``task_ids``),
        a keyword placeholder ``fxpeft_<name>`` (default None) after the model's inputs, added on first use."""
        if name not in self._call_inputs:
            placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
            # keyword inputs go before a symbolic-traced forward's **kwargs (Python allows nothing after it)
            var_keyword = next((n for n in placeholders if n.target.startswith("**")), None)
            where = self.graph.inserting_before(var_keyword) if var_keyword is not None else \
                self.graph.inserting_after(placeholders[-1]) if placeholders else \
                self.graph.inserting_before(next(iter(self.graph.nodes)))
            with where:
                node = self.graph.placeholder(call_input_name(name), default_value=None)
            node.meta["fxpeft_rule"] = "call_inputs"
            self._call_inputs[name] = node
        return self._call_inputs[name]

    def slots(self) -> torch.fx.Node:
        """The indices of the active adapters (``len(adapter_order)``: an empty slot)."""
        if self._slots is None:
            with self.graph.inserting_before(self._start):
                self._slots = self.graph.get_attr("_fxpeft_slots")
            self._slots.meta["fxpeft_rule"] = "adapter_gates"
        return self._slots

    def gate(self, adapter: str) -> torch.fx.Node:
        """A 0-dim node: 1.0 while ``adapter`` is active, else 0.0 (read from the gates buffer)."""
        if adapter not in self._gates:
            with self.graph.inserting_before(self._start):
                gates = self.graph.get_attr("_fxpeft_gates")
                self._gates[adapter] = self.graph.call_function(
                    aten.select.int, (gates, 0, self.adapter_order.index(adapter)))
            for node in (gates, self._gates[adapter]):
                node.meta["fxpeft_rule"] = "adapter_gates"  # shared by all sites: no fxpeft_site
        return self._gates[adapter]

    def _tagged(self, node: torch.fx.Node) -> torch.fx.Node:
        node.meta.update(self.tag)
        return node

    def module(self, path: str) -> Optional[nn.Module]:
        return submodule(self.root, path)

    # builders: every rewrite inserts through these, right after the site's current output
    def attr(self, fqn: str) -> torch.fx.Node:
        return self._tagged(self.graph.get_attr(fqn))

    def call(self, op, *args, **kwargs) -> torch.fx.Node:
        return self._tagged(self.graph.call_function(op, args, kwargs))

    def call_module(self, fqn: str, *args) -> torch.fx.Node:
        return self._tagged(self.graph.call_module(fqn, args))

    def copy(self, node: torch.fx.Node, values: dict) -> torch.fx.Node:
        """A copy of ``node`` that reads ``values[a]`` for each input ``a`` found there: the model's own
        code replayed on other values (its recorded shapes no longer hold, so they are dropped)."""
        copied = self.graph.node_copy(node, lambda arg: values.get(arg, arg))
        copied.meta.pop("val", None)
        return self._tagged(copied)

    def cast(self, node: torch.fx.Node, dtype: torch.dtype, from_dtype: torch.dtype) -> torch.fx.Node:
        return node if dtype == from_dtype else self.call(aten._to_copy.default, node, dtype=dtype)

    def replace_op(self, site: Site, **args: torch.fx.Node) -> torch.fx.Node:
        """Run the site's op on other operands (``input=``, ``weight=``, by the site's field names)
        in place of the original: its users read the new node, the old one is gone. For rules that
        change what the op computes with (scaled inputs, mapped weights), before any rule added to
        its output."""
        if site.output is not site.node:
            raise RuntimeError(f"{self.tag.get('fxpeft_rule')}: the op at {site.path} was already extended; "
                               "rules replacing a site's op must run in an earlier phase than rules adding to it.")
        values = {}
        if "input" in args:
            values[site.input] = args["input"]
        if "weight" in args:
            values[site.weight_node] = args["weight"]
        new = self.copy(site.node, values)
        new.meta.update({k: v for k, v in site.node.meta.items() if k.startswith("fxpeft_module")})
        site.node.replace_all_uses_with(new)
        self.graph.erase_node(site.node)
        site.node = site.output = new
        if "input" in args:
            site.input = args["input"]
        return new


def call_input_name(name: str) -> str:
    """The keyword a lowered graph (and a block's forward) takes a per-call input under."""
    return f"fxpeft_{name}"


def samples_of(index: torch.Tensor, slot: int, like: torch.Tensor) -> torch.Tensor:
    """Mixed graphs: a bool mask, broadcastable to ``like``, of the rows whose sample's adapter is
    ``slot`` (rows may be the batch flattened with a later dimension, batch first)."""
    keep = index == slot
    if like.shape[0] != keep.shape[0]:
        keep = keep.repeat_interleave(like.shape[0] // keep.shape[0])
    return keep.view(-1, *([1] * (like.dim() - 1)))


def primary_lowering(gm) -> Lowering:
    """A lowering of a copy of ``gm``'s first canonical graph (whole model, no rule applied): for
    methods that read the model's structure when attaching (the token embedding, the attentions)."""
    from .registry import registry_of
    return Lowering(copy_graph(gm._fxpeft_signatures[gm._fxpeft_primary].canonical), gm, registry_of(gm))


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    new._codegen = graph._codegen
    return new


def _apply_site_rewrite(lowering: Lowering, rule, site: Site) -> None:
    old_output = site.output
    original_users = list(old_output.users)
    anchor = old_output.next
    with lowering.graph.inserting_before(anchor):
        new_output = rule.rewrite(lowering, site)
    current = site.output  # the op itself, if the rule replaced it (Lowering.replace_op)
    if new_output is None or new_output is current:
        return
    for user in original_users:
        user.replace_input_with(current, new_output)
    site.output = new_output


def lower(canonical: torch.fx.Graph, root: nn.Module, registry, mixed: bool = False,
          adapter_order: Optional[list[str]] = None, cached: bool = False,
          call_inputs: tuple[str, ...] = ()) -> torch.fx.Graph:
    """The executable graph: ``canonical`` with every rule of ``registry`` applied, reading
    ``root``'s adapter state. In a mixed graph, calls of blocks (fxpeft/blocks.py) pass the
    per-sample index on; the graph takes each of ``call_inputs`` (``Lowering.call_input``) and passes
    it on to the blocks it calls."""
    graph = copy_graph(canonical)
    lowering = Lowering(graph, root, registry, mixed, adapter_order, cached, call_inputs)
    for node in graph.nodes:
        if node.meta.get("fxpeft_block"):
            if mixed:
                node.update_kwarg("adapter_index", lowering.sample_index)
            for name in call_inputs:
                node.update_kwarg(call_input_name(name), lowering.call_input(name))
    for rule in registry.rules:
        for candidate in list(rule.match(lowering)):
            lowering.tag = {"fxpeft_rule": rule.name}
            if rule.on_sites:
                lowering.tag["fxpeft_site"] = candidate.path
                _apply_site_rewrite(lowering, rule, candidate)
            else:
                rule.rewrite(lowering, candidate)
    graph.lint()
    return graph
