"""The rewrite driver: rules are data, one function applies them all.

A method (a file in ``passes/``) registers:

- a :class:`Method` for its config type: ``attach(gm, sites, config, adapter_name)`` creates the
  adapter's parameters beside the module they adapt (``<path>.lora_A.<adapter>.weight``);
- :class:`Rule` objects: ``match`` finds places in a canonical graph (sites, or any node
  pattern), ``constraint`` filters them by the state attached to the module tree, and
  ``rewrite`` inserts the nodes. Rules run by ``phase`` (replace base ops, then transform
  inputs, then add deltas), so methods stack without knowing of each other.

:func:`lower` turns a canonical graph plus the adapter state in the module tree into the
executable graph. Any change of adapter state re-lowers from the canonical graph, so a graph
never accumulates stale rewrites, and its structure depends on which adapters *exist*, not on
which are active (activity is buffer data the graph reads).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
import torch.fx
from torch import nn

from .canonical import Site, find_sites, submodule

aten = torch.ops.aten


class Lowering:
    """One graph being lowered: the graph, the module tree it reads from, and its sites."""

    def __init__(self, graph: torch.fx.Graph, root: nn.Module, mixed: bool = False,
                 adapter_order: Optional[list[str]] = None):
        self.graph = graph
        self.root = root  # the module the graph reads: the result, or one of its blocks
        self.sites = find_sites(graph, root)
        self.tag: dict[str, str] = {}  # stamped on every inserted node's meta (for inspection)
        self.adapter_order = list(getattr(root, "peft_config", {}) if adapter_order is None else adapter_order)
        self.mixed = mixed  # per-sample adapters: the graph takes an index tensor as first input
        self.sample_index = None
        if mixed:
            with graph.inserting_before(next(iter(graph.nodes))):
                self.sample_index = graph.placeholder("fxpeft_adapter_index")
        self._start = next(iter(graph.nodes))  # gates are read at the top, before any use
        self._gates: dict[str, torch.fx.Node] = {}  # keyed by adapter name: any string is a valid name
        self._slots: Optional[torch.fx.Node] = None

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


@dataclass(frozen=True)
class Rule:
    """``match(lowering)`` yields candidates; ``rewrite(lowering, candidate)`` edits the graph.

    For site rules (made with :func:`site_rule`) the driver inserts at the site's current output
    and re-points the output's original users at what ``rewrite`` returns.
    """

    name: str
    match: Callable[[Lowering], Iterable[Any]]
    rewrite: Callable[[Lowering, Any], Any]
    phase: int = 50
    on_sites: bool = False


def site_rule(name: str, constraint: Callable[[Site, nn.Module], bool], rewrite, phase: int = 50) -> Rule:
    def match(lowering: Lowering):
        for site in lowering.sites:
            module = lowering.module(site.path)
            if module is not None and constraint(site, module):
                yield site
    return Rule(name=name, match=match, rewrite=rewrite, phase=phase, on_sites=True)


RULES: list[Rule] = []


def register_rule(rule: Rule) -> Rule:
    RULES.append(rule)
    RULES.sort(key=lambda r: r.phase)
    return rule


@dataclass(frozen=True)
class Method:
    """How one config type attaches, describes and folds adapter state on a transformed module.

    ``containers`` are the child-module names holding per-adapter state beside an adapted
    module (``lora_A`` …): checkpoints drop the adapter name after them, deletion removes the
    adapter's entry from them. ``adapters_at(module)`` lists the adapters on a module;
    ``gate(module, adapter)`` is its :class:`AdapterScale`-like switch (``active``, ``merged``,
    ``refresh()``); ``delta_weight(gm, site, module, adapter)`` is what merging adds to the weight.
    """

    config_type: type
    attach: Optional[Callable[..., list[str]]] = None  # (gm, sites, config, adapter_name) -> adapted paths;
    # None: not an adapter (quantization), its work is a tree pass
    containers: tuple[str, ...] = ()
    adapters_at: Optional[Callable] = None
    gate: Optional[Callable] = None
    delta_weight: Optional[Callable] = None
    resolve_config: Optional[Callable] = None  # (gm, sites, config) -> config as stored (PEFT resolves targets)
    # Prompt learning (prompt / prefix tuning) edits the sequence itself, so: its adapter is the
    # model's only one, its rules read which adapters act at lowering time (an inactive prompt
    # changes the sequence length, which data cannot express), and its checkpoint holds tensors the
    # method computes (``saved_tensors(gm, adapter) -> {key: tensor}``, read back by
    # ``load_saved(gm, adapter, {key: tensor})``) under ``checkpoint_prefix``.
    prompt_learning: bool = False
    saved_tensors: Optional[Callable] = None
    load_saved: Optional[Callable] = None
    checkpoint_prefix: str = "base_model.model."
    # ``dropped_inputs(config) -> frozenset`` of input names the model is called without while the
    # adapter acts (PEFT's prompt methods drop some): the dispatcher leaves them out of the call.
    dropped_inputs: Optional[Callable] = None
    # Its rules must see the whole model in one graph (one prefix per attention, dealt in model
    # order): a result made with it keeps the flat graph instead of one graph per block.
    whole_graph: bool = False


METHODS: dict[type, Method] = {}


def register_method(method: Method) -> Method:
    METHODS[method.config_type] = method
    return method


# Passes over the module tree, run by ``build`` on fxpeft's copy of the tree before capture:
# ``(tree, configs) -> None``. For what changes the base layers the graph reads (quantization),
# which a later capture must see too.
TREE_PASSES: list[Callable] = []


def samples_of(index: torch.Tensor, slot: int, like: torch.Tensor) -> torch.Tensor:
    """Mixed graphs: a bool mask, broadcastable to ``like``, of the rows whose sample's adapter is
    ``slot`` (rows may be the batch flattened with a later dimension, batch first)."""
    keep = index == slot
    if like.shape[0] != keep.shape[0]:
        keep = keep.repeat_interleave(like.shape[0] // keep.shape[0])
    return keep.view(-1, *([1] * (like.dim() - 1)))


def is_adapter_state(path: str) -> bool:
    """Whether a module path lies inside some adapter's state (``...q_proj.lora_A.default``)."""
    containers = {"modules_to_save", *(c for method in METHODS.values() for c in method.containers)}
    return any(part in containers for part in path.split("."))


def method_for(config) -> Method:
    for config_type in type(config).__mro__:
        if config_type in METHODS:
            return METHODS[config_type]
    known = ", ".join(sorted(t.__name__ for t in METHODS))
    raise TypeError(f"No fxpeft pass handles {type(config).__name__}; supported configs: {known}.")


def copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    output = new.graph_copy(graph, {})
    new.output(output)
    new._codegen = graph._codegen
    return new


def _apply_site_rewrite(lowering: Lowering, rule: Rule, site: Site) -> None:
    old_output = site.output
    original_users = list(old_output.users)
    anchor = old_output.next
    with lowering.graph.inserting_before(anchor):
        new_output = rule.rewrite(lowering, site)
    if new_output is None or new_output is old_output:
        return
    for user in original_users:
        user.replace_input_with(old_output, new_output)
    site.output = new_output


def lower(canonical: torch.fx.Graph, root: nn.Module, mixed: bool = False,
          adapter_order: Optional[list[str]] = None) -> torch.fx.Graph:
    """The executable graph: ``canonical`` with every rule applied, reading ``root``'s adapter
    state. In a mixed graph, calls of blocks (fxpeft/blocks.py) pass the per-sample index on."""
    graph = copy_graph(canonical)
    lowering = Lowering(graph, root, mixed, adapter_order)
    if mixed:
        for node in graph.nodes:
            if node.meta.get("fxpeft_block"):
                node.update_kwarg("adapter_index", lowering.sample_index)
    for rule in RULES:
        for candidate in list(rule.match(lowering)):
            lowering.tag = {"fxpeft_rule": rule.name}
            if rule.on_sites:
                lowering.tag["fxpeft_site"] = candidate.path
                _apply_site_rewrite(lowering, rule, candidate)
            else:
                rule.rewrite(lowering, candidate)
    graph.lint()
    return graph
