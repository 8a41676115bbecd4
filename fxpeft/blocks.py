"""Block structure: the model's repeated blocks (decoder layers, encoder layers, vision blocks)
as modules of their own in the result, each running a graph.

A captured graph is flat: every parameter is read from the root. Training tools work per block:
FSDP2 all-gathers a block's parameters in that block's forward hooks, activation checkpointing
recomputes a block, regional compilation compiles one. So the result keeps each block as a
``call_module`` target under its original path:

- :func:`find_block_paths`: the children of a ``ModuleList`` whose modules all share one class
  (at least two, each with children of its own), outermost lists only;
- :func:`outline`: the flat canonical graph split into a top graph that calls the blocks and one
  canonical graph per block that reads the block module with relative names. A node belongs to
  the block its ``nn_module_stack`` (or, for ``get_attr``, its target) names; a node with neither
  belongs to the block all its users are in. Blocks whose nodes are not one convex region (some
  outside node both reads from and feeds the block) make the whole graph stay flat;
- :class:`Block`: the module installed at a block's path. It shares the original block's
  parameters, buffers and children (state_dict keys do not move) and runs one lowered graph per
  structure: blocks whose canonical graphs have the same structure share the lowered code.
"""
from __future__ import annotations

import contextlib
import hashlib
import heapq
import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.fx
from torch import nn
from torch.utils.checkpoint import checkpoint

from .canonical import _resolve, submodule
from .registry import ALONE, adapter_entries, walk_modules


def find_block_paths(tree: nn.Module) -> list[str]:
    """Paths of the model's repeated blocks (``model.layers.0`` …)."""
    found: list[str] = []
    for path, module in tree.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if any(path.startswith(block + ".") for block in found):
            continue  # a list inside a block: the outer block is the unit
        children = list(module)
        if len({type(child) for child in children}) == 1 and len(children[0]._modules) > 0:
            found += [f"{path}.{name}" if path else name for name in module._modules]
    return found


@dataclass
class BlockGraph:
    """One block's canonical graph: inputs are placeholders, outputs one tuple, names relative."""

    graph: torch.fx.Graph
    key: str  # structure: blocks with equal keys have equal graphs
    extras: dict[str, Any] = field(default_factory=dict)  # local name -> module / tensor it reads
    origins: dict[str, str] = field(default_factory=dict)  # local name -> the root name it came from
    cached: bool = False  # of a call with a KV cache (generation): lowered as such (``Lowering.cached``)


@dataclass
class Outlined:
    top: torch.fx.Graph  # calls each block: call_module(path, inputs, {"variant": key})
    blocks: dict[str, BlockGraph]


def _owner_block(node: torch.fx.Node, blocks: list[str]) -> Optional[str]:
    def block_of(path) -> Optional[str]:
        if not isinstance(path, str):
            return None
        return next((b for b in blocks if path == b or path.startswith(b + ".")), None)

    if node.op == "get_attr":
        return block_of(node.target)
    if node.op in ("call_function", "call_method", "call_module"):
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            found = block_of(path)
            if found is not None:
                return found
    return None


def _homeless(node: torch.fx.Node) -> bool:
    """A node no module claims: a size or helper op export recorded outside any module, or a
    constant canonicalize registered on the root (a name without a module path)."""
    if node.op == "get_attr":
        return "." not in node.target
    if node.op not in ("call_function", "call_method", "call_module"):
        return False
    paths = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values()]
    return not any(isinstance(p, str) and p and not p.startswith("_empty") for p in paths)


def _assign(graph: torch.fx.Graph, blocks: list[str]) -> dict[torch.fx.Node, Optional[str]]:
    owner = {node: _owner_block(node, blocks) for node in graph.nodes}
    for node in reversed(list(graph.nodes)):  # homeless helpers go with their users' block
        if owner[node] is None and _homeless(node) and node.users:
            user_blocks = {owner[user] for user in node.users}
            if len(user_blocks) == 1 and None not in user_blocks:
                owner[node] = user_blocks.pop()
    return owner


def _convex(graph: torch.fx.Graph, owner: dict, block: str) -> bool:
    """No node outside ``block`` reads from it and also feeds it."""
    downstream: set = set()  # outside nodes that depend on the block
    for node in graph.nodes:
        if owner[node] == block:
            if any(arg in downstream for arg in node.all_input_nodes):
                return False
        elif any(owner[arg] == block or arg in downstream for arg in node.all_input_nodes):
            downstream.add(node)
    return True


def _relative(path: str, block: str) -> str:
    return path[len(block) + 1:]


def _block_graph(graph: torch.fx.Graph, owner: dict, block: str, root: nn.Module, cached: bool):
    """(BlockGraph, inputs, outputs): the block's nodes copied into a graph of their own."""
    nodes = [n for n in graph.nodes if owner[n] == block]
    inside = set(nodes)
    inputs: list[torch.fx.Node] = []
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]
    new = torch.fx.Graph()
    values = {arg: new.placeholder(f"input_{i}") for i, arg in enumerate(inputs)}
    extras: dict[str, Any] = {}
    local_names: dict[str, str] = {}
    for node in nodes:
        copied = new.node_copy(node, lambda arg: values[arg])
        if node.op in ("get_attr", "call_module"):
            if node.target.startswith(block + "."):
                copied.target = _relative(node.target, block)
            else:  # something canonicalize registered on the root (a mode switch, a constant)
                if node.target not in local_names:
                    local_names[node.target] = f"_fxpeft_local_{len(local_names)}"
                    extras[local_names[node.target]] = _resolve(root, node.target)
                copied.target = local_names[node.target]
        if "fxpeft_module" in copied.meta and isinstance(copied.meta["fxpeft_module"], str) \
                and copied.meta["fxpeft_module"].startswith(block + "."):
            copied.meta["fxpeft_module"] = _relative(copied.meta["fxpeft_module"], block)
        stack = copied.meta.get("nn_module_stack")
        if stack:  # relative paths inside the block, what lies outside dropped
            copied.meta["nn_module_stack"] = {k: (_relative(p, block), t) for k, (p, t) in stack.items()
                                              if isinstance(p, str) and p.startswith(block + ".")}
        values[node] = copied
    new.output(tuple(values[n] for n in outputs))
    origins = {local: original for original, local in local_names.items()}
    key = _structure_key(new) + ("-cached" if cached else "")  # lowered otherwise: its own variant
    return BlockGraph(new, key, extras, origins, cached), inputs, outputs


def _structure_key(graph: torch.fx.Graph) -> str:
    """Equal for graphs that do the same thing on their own module (names aside)."""
    index = {node: i for i, node in enumerate(graph.nodes)}
    parts = []
    for node in graph.nodes:
        args = torch.fx.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__qualname__", str(node.target))
        parts.append(f"{node.op}|{target}|{args!r}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]


def outline(graph: torch.fx.Graph, root: nn.Module, blocks: list[str], cached: bool = False) -> Optional[Outlined]:
    """Split a flat canonical graph into a top graph calling ``blocks`` and one graph per block;
    None when some block is not one convex region (the graph then stays flat). ``cached``: the graph
    reads a KV cache."""
    owner = _assign(graph, blocks)
    present = [b for b in blocks if any(owner[n] == b and n.op != "get_attr" for n in graph.nodes)]
    if not present or not all(_convex(graph, owner, b) for b in present):
        return None
    block_graphs, calls = {}, {}
    for block in present:
        block_graphs[block], inputs, outputs = _block_graph(graph, owner, block, root, cached)
        calls[block] = (inputs, outputs)
    return Outlined(_top_graph(graph, owner, calls, block_graphs), block_graphs)


def _top_graph(graph: torch.fx.Graph, owner: dict, calls: dict, block_graphs: dict) -> torch.fx.Graph:
    """The outside nodes and one call per block, in an order close to the original (a topological
    sort keyed by original position; a block call sits where the block's first node was)."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    first = {block: min(position[n] for n in graph.nodes if owner[n] == block) for block in calls}
    units: list[Any] = [n for n in graph.nodes if owner[n] is None or owner[n] not in calls] + list(calls)
    unit_of = {n: (owner[n] if owner[n] in calls else n) for n in graph.nodes}
    deps: dict[Any, set] = {}
    for unit in units:
        sources = calls[unit][0] if isinstance(unit, str) else unit.all_input_nodes
        deps[unit] = {unit_of[arg] for arg in sources} - {unit}
    users: dict[Any, list] = {unit: [] for unit in units}
    for unit, needs in deps.items():
        for need in needs:
            users[need].append(unit)
    key = lambda unit: first[unit] if isinstance(unit, str) else position[unit]  # noqa: E731
    ready = [(key(u), i, u) for i, u in enumerate(units) if not deps[u]]
    heapq.heapify(ready)
    waiting = {u: len(deps[u]) for u in units}
    new = torch.fx.Graph()
    values: dict[torch.fx.Node, torch.fx.Node] = {}
    counter = len(units)
    while ready:
        _, _, unit = heapq.heappop(ready)
        if isinstance(unit, str):
            inputs, outputs = calls[unit]
            call = new.call_module(unit, tuple(values[arg] for arg in inputs),
                                   {"variant": block_graphs[unit].key})
            call.meta["fxpeft_block"] = unit
            for i, out in enumerate(outputs):
                values[out] = new.call_function(operator.getitem, (call, i))
                values[out].meta = dict(out.meta)
        else:
            values[unit] = new.node_copy(unit, lambda arg: values[arg])
        for user in users[unit]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready, (key(user), counter, user))
                counter += 1
    new._codegen = graph._codegen
    new.lint()
    return new


class Block(nn.Module):
    """A repeated block of the model, run as a lowered graph. It shares the original block's
    parameters and buffers (and its children), so state_dict keys and per-block hooks are the
    model's own; ``variants`` maps a structure key to (dense fn, mixed fn) shared by every block of
    that structure."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self._parameters = original._parameters  # shared: .to() and FSDP2 act on both
        self._buffers = original._buffers
        self._non_persistent_buffers_set = original._non_persistent_buffers_set
        self._modules = dict(original._modules)  # own: block-local extras are registered here
        self.__dict__["block_class"] = type(original).__name__
        self.__dict__["variants"] = {}
        self.__dict__["graphs"] = {}  # structure key -> the dense lowered graph (for reading)
        self.gradient_checkpointing = False  # the attribute transformers' tools read
        self.checkpoint_options: dict = {}  # torch.utils.checkpoint's keywords, and offload

    def forward(self, *inputs, variant: str, adapter_index: Optional[torch.Tensor] = None, **call_inputs):
        """``call_inputs``: the per-call inputs its graphs take (``Method.call_inputs``), by keyword."""
        dense, mixed = self.variants[variant]
        fn, args = (dense, inputs) if adapter_index is None else (mixed, (adapter_index, *inputs))
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            options = dict(self.checkpoint_options)
            offload = options.pop("offload", False)
            # only inputs that need gradients go through checkpoint; the others (masks, rotary tables,
            # sizes) are read by the recompute as they are, as transformers' checkpointed layers do
            differentiable = [i for i, arg in enumerate(args) if isinstance(arg, torch.Tensor) and arg.requires_grad]

            def recompute(*values):
                full = list(args)
                for i, value in zip(differentiable, values):
                    full[i] = value
                return fn(self, *full, **call_inputs)

            with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()) if offload \
                    else contextlib.nullcontext():
                # non-reentrant: adapter parameters inside get gradients although the inputs need none
                return checkpoint(recompute, *(args[i] for i in differentiable), use_reentrant=False, **options)
        return fn(self, *args, **call_inputs)

    def extra_repr(self) -> str:
        return f"fxpeft block of {self.block_class}"


def install_blocks(tree: nn.Module, block_paths: list[str]) -> nn.Module:
    """A root for the result: ``tree``'s modules, with a :class:`Block` at each block path and new
    objects for the modules above them (the source tree keeps its own, to capture again)."""
    root = _shallow(tree)
    for path in block_paths:
        parent = root
        parts = path.split(".")
        for name in parts[:-1]:
            child = parent._modules[name]
            if not getattr(child, "_fxpeft_fresh", False):
                child = _shallow(child)
                parent._modules[name] = child
            parent = child
        parent._modules[parts[-1]] = Block(submodule(tree, path))
    for module in root.modules():
        module.__dict__.pop("_fxpeft_fresh", None)
    return root


def _shallow(module: nn.Module) -> nn.Module:
    import copy

    new = copy.copy(module)
    new._modules = dict(module._modules)  # tensors shared, children dict its own
    new.__dict__["_fxpeft_fresh"] = True
    return new


def blocks_of(root: nn.Module) -> dict[str, Block]:
    return {path: module for path, module in root.named_modules() if isinstance(module, Block)}


def running_blocks(gm: nn.Module) -> dict[str, Block]:
    """The blocks every captured graph calls; none where some graph stayed flat (its blocks would be
    installed but never run, so checkpointing, regional compilation or sharding them would do nothing)."""
    signatures = getattr(gm, "_fxpeft_signatures", {})
    if any(signature.outlined is None for signature in signatures.values()):
        return {}
    return blocks_of(gm)



def compile_blocks(gm: nn.Module, **compile_kwargs) -> list[str]:
    """Regional compilation: ``torch.compile`` each block (``Block.compile``) instead of the whole
    model. Blocks of one structure run the same code, so dynamo compiles it once and reuses it
    for the others (once more where a block's inputs first require grad: after the frozen
    embeddings). Much faster to compile than the whole model; the glue between blocks runs eagerly.
    Returns the compiled blocks' paths."""
    blocks = running_blocks(gm)
    if not blocks:
        raise ValueError("compile_blocks compiles the model's repeated blocks, and this fxpeft module has none "
                         "(no ModuleList of same-class blocks, or a method that keeps the graph flat): use "
                         "torch.compile(gm) instead.")
    for block in blocks.values():
        block.compile(**compile_kwargs)
    gm.__dict__["_fxpeft_compiled_blocks"] = True  # the eager call prepares what compiled blocks read
    return list(blocks)


# ----------------------------------------------------------------------------- capturing few blocks
#
# Exporting a 32-layer model traces 32 copies of one layer. When a list's blocks from the second on
# are alike, fxpeft exports the model with the first two only, then calls the second block's graph
# for every later block (with that block's own module) and rebuilds the flat graph from the result.


def fingerprint(module: nn.Module, containers: Iterable[str] = (), adapters: Iterable[str] = ()) -> tuple:
    """What makes two blocks compute alike: classes, tensor shapes and dtypes, plain settings (a layer
    index aside, which only a KV cache reads). Equal blocks capture alike and, with their adapters
    attached, lower alike. An adapter's entry in a container (``q_proj.lora_A.<adapter>``, ``adapters``
    naming the adapters, ``containers`` the containers) is read once (:func:`_entry_print`)."""
    return tuple((path, *_module_print(sub)) if whole else (path, _entry_print(sub))
                 for path, sub, whole in walk_modules(module, adapter_entries(containers, adapters, ALONE)))


_PLAIN = (int, float, str, bool, type(None))


def _module_print(sub: nn.Module) -> tuple:
    settings = tuple(sorted((k, v) for k, v in vars(sub).items()
                            if not k.startswith("_") and "idx" not in k and isinstance(v, _PLAIN)))
    tensors = tuple((n, tuple(t.shape), t.dtype) for n, t in [*sub._parameters.items(), *sub._buffers.items()]
                    if t is not None)
    return type(sub).__name__, settings, tensors


# adapter entry -> its print, read once: what lowering reads of an entry (classes, ranks, a gate's scale,
# dtypes) is set when the adapter is attached; ``forget_entry_prints`` runs where dtypes change (``_apply``).
# A print stands in a block's fingerprint as a small number (``_PRINT_NUMBERS``), which hashes and
# compares in a time that does not grow with the entry.
_ENTRY_PRINTS: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()
_PRINT_NUMBERS: dict[tuple, int] = {}
_NEXT_NUMBER = itertools.count()  # next() is atomic: two threads never draw one number


def _entry_print(entry: nn.Module) -> int:
    """The fingerprint of one adapter's entry (its whole subtree) as a number, read the first time it
    is asked for: re-reading every loaded adapter's entries made each ``add_adapter`` cost grow with the
    adapters loaded."""
    number = _ENTRY_PRINTS.get(entry)
    if number is None:
        printed = tuple((path, *_module_print(m)) for path, m in entry.named_modules())
        number = _ENTRY_PRINTS[entry] = _PRINT_NUMBERS.setdefault(printed, next(_NEXT_NUMBER))
    return number


def forget_entry_prints() -> None:
    _ENTRY_PRINTS.clear()


def repeated_lists(tree: nn.Module, block_paths: list[str]) -> dict[str, int]:
    """ModuleList path -> block count, for lists of at least three blocks whose blocks from the second
    on are alike (the first may differ: T5's first block holds the position bias)."""
    lists: dict[str, list[str]] = {}
    for path in block_paths:
        lists.setdefault(path.rpartition(".")[0], []).append(path)
    found = {}
    per_layer = _per_layer_settings(tree)
    for path, members in lists.items():
        if len(members) >= 3 and len({fingerprint(submodule(tree, m)) for m in members[1:]}) == 1 \
                and not any(len(values) == len(members) and len(set(map(repr, values[1:]))) > 1
                            for values in per_layer):
            found[path] = len(members)
    return found


def _per_layer_settings(tree: nn.Module) -> list[list]:
    """List-valued settings of a transformers config (``layer_types`` …): code between the blocks
    may read them by layer index, which a two-block capture would not see."""
    config = getattr(tree, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return []
    found, pending = [], [config.to_dict()]
    while pending:
        for value in pending.pop().values():
            if isinstance(value, dict):
                pending.append(value)
            elif isinstance(value, (list, tuple)):
                found.append(list(value))
    return found


def truncated(tree: nn.Module, lists: dict[str, int]) -> nn.Module:
    """A copy of the tree (tensors shared) whose repeated lists hold their first two blocks."""
    from .module import clone_tree

    small = clone_tree(tree)
    for path in lists:
        holder = small.get_submodule(path)
        holder._modules = dict(list(holder._modules.items())[:2])
    return small


def extend(outlined: Outlined, lists: dict[str, int]) -> Optional[Outlined]:
    """The top graph of a two-block capture with every later block called as the second one is; None
    where the graph does not show one block simply feeding the next (then export the whole model)."""
    top = outlined.top
    blocks = dict(outlined.blocks)
    for path, count in lists.items():
        calls = {n.meta.get("fxpeft_block"): n for n in top.nodes if n.meta.get("fxpeft_block")}
        first, second = calls.get(f"{path}.0"), calls.get(f"{path}.1")
        if first is None or second is None:
            return None
        outs = [{u.args[1]: u for u in call.users if u.target is operator.getitem and len(u.args) == 2}
                for call in (first, second)]
        if len(outs[0]) != len(first.users) or len(outs[1]) != len(second.users):
            return None
        fed = {node: index for index, node in outs[0].items()}
        if any(user is not second for node in fed for user in node.users):
            return None  # the first block's outputs reach more than the second block (hidden-state lists …)
        if any(arg in fed and fed[arg] not in outs[1] for arg in second.args):
            return None  # the second block passes an input of the first on without computing it
        later_users = {index: [u for u in node.users] for index, node in outs[1].items()}
        previous, anchor = outs[1], max(outs[1].values(), key=lambda n: list(top.nodes).index(n), default=second)
        for i in range(2, count):
            args = tuple(previous[fed[arg]] if arg in fed else arg for arg in second.args)
            with top.inserting_after(anchor):
                call = top.call_module(f"{path}.{i}", args, dict(second.kwargs))
            call.meta = dict(second.meta, fxpeft_block=f"{path}.{i}")
            current, anchor = {}, call
            for index in sorted(outs[1]):
                with top.inserting_after(anchor):
                    current[index] = anchor = top.call_function(operator.getitem, (call, index))
                current[index].meta = dict(outs[1][index].meta)
            blocks[f"{path}.{i}"] = blocks[f"{path}.1"]
            previous = current
        for index, users in later_users.items():
            for user in users:
                user.replace_input_with(outs[1][index], previous[index])
    top.lint()
    return Outlined(top, blocks)


def inline(outlined: Outlined) -> torch.fx.Graph:
    """The flat graph an outlined one stands for: each block call replaced by its block's nodes, with
    full paths (what site discovery, merging and inspection read)."""
    flat = torch.fx.Graph()
    values: dict = {}
    for node in outlined.top.nodes:
        path = node.meta.get("fxpeft_block")
        if path is None:
            if node.op == "call_function" and node.target is operator.getitem and node.args[0] in values \
                    and isinstance(values[node.args[0]], tuple):
                values[node] = values[node.args[0]][node.args[1]]
            else:
                values[node] = flat.node_copy(node, lambda arg: values[arg])
            continue
        block = outlined.blocks[path]
        inner_values = {}
        placeholders = [n for n in block.graph.nodes if n.op == "placeholder"]
        for placeholder, arg in zip(placeholders, node.args):
            inner_values[placeholder] = values[arg]
        for inner in block.graph.nodes:
            if inner.op == "placeholder":
                continue
            if inner.op == "output":
                values[node] = tuple(inner_values[n] for n in inner.args[0])
                break
            copied = flat.node_copy(inner, lambda arg: inner_values[arg])
            if inner.op in ("get_attr", "call_module"):
                copied.target = block.origins.get(inner.target, f"{path}.{inner.target}")
            if isinstance(copied.meta.get("fxpeft_module"), str):
                copied.meta["fxpeft_module"] = f"{path}.{copied.meta['fxpeft_module']}"
            stack = copied.meta.get("nn_module_stack")
            if stack:
                copied.meta["nn_module_stack"] = {k: (f"{path}.{p}", t) for k, (p, t) in stack.items()}
            inner_values[inner] = copied
    flat._codegen = outlined.top._codegen
    flat.lint()
    return flat
