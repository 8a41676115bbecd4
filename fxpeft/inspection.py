"""What a pass did to a graph: a per-site table, pictures scoped to what a person asks about
(one site, one block, one adapter, the whole model in summary), DOT, networkx, and a
before/after diff.

Every node a rule inserts carries ``meta["fxpeft_rule"]`` (and ``meta["fxpeft_site"]`` for site
rules), stamped by the driver, so the report reads the graph itself rather than bookkeeping. It
reads the whole model as one graph with full module paths: the flat canonical graph lowered with
the module's adapter state, which is what the top graph and its blocks (fxpeft/blocks.py) run.
Pictures are :class:`fxpeft.drawing.Picture` values: ``.save("pic.svg")`` / ``.png`` / ``.dot``.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

import torch.fx
from torch import nn

from .blocks import find_block_paths
from .drawing import Box, Picture
from .registry import registry_of
from .rewrite import lower
from .state import adapter_modules


@dataclass
class SiteRow:
    """One rewritten site and the rule that rewrote it: a row of ``print(fxpeft.inspect(gm))``."""

    path: str
    method: str
    adapters: list
    shape: str
    params: int  # adapter parameters at this site (trainable or not)
    ranks: dict = field(default_factory=dict)  # adapter -> what its method says of it there ("r=8")


def _module_paths(node: torch.fx.Node) -> list:
    """The module paths a node was recorded under, outermost first (export's nn_module_stack)."""
    return [entry[0] for entry in node.meta.get("nn_module_stack", {}).values()]


def _inside(path: str, scope: str) -> bool:
    return path == scope or path.startswith(scope + ".")


def _op_name(node: torch.fx.Node) -> str:
    """``aten.linear.default`` -> ``linear``; call_module -> the module path; a function -> its name."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[0] if hasattr(node.target, "_schema") else name
    return str(node.target)


def _code_line(node: torch.fx.Node) -> str:
    """One node as one readable line of code (for scoped diffs)."""
    def show(arg):
        if isinstance(arg, torch.fx.Node):
            return arg.name
        if isinstance(arg, (list, tuple)):
            return "[" + ", ".join(map(show, arg)) + "]"
        return repr(arg)

    args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
    if node.op == "get_attr":
        return f"{node.name} = self.{node.target}"
    if node.op == "placeholder":
        return f"{node.name} = input"
    if node.op == "output":
        return f"return {', '.join(args)}"
    callee = f"self.{node.target}" if node.op == "call_module" else _op_name(node)
    return f"{node.name} = {callee}({', '.join(args)})"


def _adapters_text(row: SiteRow, names) -> str:
    """'default r=8, other r=4': each adapter with what its method says of it at the site."""
    return ", ".join(f"{name} {row.ranks.get(name, '')}".strip() for name in names)


def _closest(name: str, known, what: str) -> KeyError:
    close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.4)
    hint = f" Closest: {', '.join(close)}." if close else f" Known: {', '.join(sorted(known)[:10])}."
    return KeyError(f"No {what} {name!r} in this model.{hint}")


class Report:
    """What fxpeft did to one transformed module (``fxpeft.inspect(gm)``).

    ``rows`` (one :class:`SiteRow` per rewritten site and rule) print as a table (``print(report)``);
    ``summary()``, ``site(path)``, ``block(path)`` and ``adapter(name)`` are pictures to
    ``.save("pic.svg")`` (or ``.png``); ``diff(scope)`` is the code before and after the passes.
    ``graph`` is the whole model as one lowered graph with full module paths."""

    def __init__(self, gm):
        self.gm = gm
        self.canonical = gm._fxpeft_signatures[gm._fxpeft_primary].canonical
        self.graph = lower(self.canonical, gm, registry_of(gm)) if gm._fxpeft_block_paths else gm.graph
        self.rows = self._rows()

    def _rows(self) -> list[SiteRow]:
        rewritten = {(n.meta["fxpeft_site"], n.meta["fxpeft_rule"]) for n in self.graph.nodes if n.meta.get("fxpeft_site")}
        is_adapter_state = registry_of(self.gm).is_adapter_state
        described: dict = {}  # path -> adapter -> what the methods say of their adapters there ("r=8")
        for path, module, method, adapter in adapter_modules(self.gm, list(self.gm.peft_config)):
            if method.describe is not None:
                described.setdefault(path, {})[adapter] = method.describe(module, adapter)
        rows = []
        for path, rule in sorted(rewritten):
            module = self.gm.get_submodule(path)
            adapters = {key for name, child in module.named_children() if is_adapter_state(name)
                        and isinstance(child, (nn.ModuleDict, nn.ParameterDict)) for key in child.keys()}
            params = sum(p.numel() for name, p in module.named_parameters() if is_adapter_state(name))
            ranks = described.get(path, {})
            weight = getattr(module, "weight_spec", None) or getattr(module, "weight", None)  # quantized: logical
            shape = "x".join(map(str, weight.shape)) if weight is not None else "-"
            shape += f" {module.storage}" if hasattr(module, "storage") else ""
            rows.append(SiteRow(path, rule, sorted(adapters), f"{shape} {' '.join(sorted(set(ranks.values())))}".strip(),
                                params, dict(ranks)))
        return rows

    def __str__(self) -> str:
        header = ("module", "method", "adapters", "weight / rank", "adapter params")
        table = [header] + [(r.path, r.method, ",".join(r.adapters), r.shape, f"{r.params:,d}") for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        inserted = sum(1 for n in self.graph.nodes if "fxpeft_rule" in n.meta)
        from .lifecycle import trainable_parameters

        trainable, total = trainable_parameters(self.gm)
        lines.append(f"{len(self.rows)} rewritten sites, {inserted} inserted nodes, "
                     f"{trainable:,d} trainable of {total:,d} parameters")
        return "\n".join(lines)

    __repr__ = __str__

    # ------------------------------------------------------------------ whole graph

    def to_networkx(self):
        """The whole lowered graph as a ``networkx.DiGraph``: nodes by name with ``op``, ``target``,
        ``inserted`` (bool), ``rule`` and ``site``; an edge per data dependency."""
        import networkx as nx

        graph = nx.DiGraph()
        for node in self.graph.nodes:
            graph.add_node(node.name, op=node.op, target=str(node.target), inserted="fxpeft_rule" in node.meta,
                           rule=node.meta.get("fxpeft_rule"), site=node.meta.get("fxpeft_site"))
            for source in node.all_input_nodes:
                graph.add_edge(source.name, node.name)
        return graph

    def to_dot(self) -> str:
        """The whole lowered graph as Graphviz DOT, one box per node (inserted nodes filled).
        Large for real models: ``site()``, ``block()`` and ``summary()`` draw what one can read."""
        lines = ["digraph fxpeft {", "  node [shape=box, fontname=monospace, fontsize=10];"]
        for node in self.graph.nodes:
            label = f"{node.name}\\n{node.op}: {node.target}".replace('"', "'")  # full target: no cut names
            style = ', style=filled, fillcolor="#ffcf70"' if "fxpeft_rule" in node.meta else ""
            lines.append(f'  "{node.name}" [label="{label}"{style}];')
        for node in self.graph.nodes:
            for source in node.all_input_nodes:
                lines.append(f'  "{source.name}" -> "{node.name}";')
        lines.append("}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ scopes

    def site_paths(self) -> list:
        """The paths of the rewritten sites, the names ``site()`` takes."""
        return sorted({row.path for row in self.rows})

    def _check_scope(self, path: str) -> None:
        """A site or module path of the model, else a KeyError naming the closest."""
        modules = dict(self.gm.named_modules())
        if path not in modules or not any(self._in_scope(n, path) for n in self.graph.nodes):
            raise _closest(path, [p for p in modules if p], "module")

    @staticmethod
    def _in_scope(node: torch.fx.Node, scope: str) -> bool:
        """The node computes part of module ``scope``: recorded under it, reads its state, or was
        inserted for a site inside it."""
        if node.op == "get_attr":
            return _inside(str(node.target).rpartition(".")[0], scope)
        site = node.meta.get("fxpeft_site")
        if site is not None:
            return _inside(site, scope)
        return any(_inside(p, scope) for p in _module_paths(node))

    def diff(self, scope: Optional[str] = None, context: int = 1) -> str:
        """Unified diff of the code before the passes (the canonical graph) and after them.
        ``scope`` (a site or module path, e.g. one block) keeps the lines of nodes inside it."""
        if scope is None:
            before = self.canonical.python_code("self").src.splitlines()
            after = self.graph.python_code("self").src.splitlines()
        else:
            self._check_scope(scope)
            before = [_code_line(n) for n in self.canonical.nodes if self._in_scope(n, scope)]
            after = [_code_line(n) for n in self.graph.nodes if self._in_scope(n, scope)]
        return "\n".join(difflib.unified_diff(before, after, "canonical", "rewritten", n=context, lineterm=""))

    def site(self, path: str) -> Picture:
        """One rewritten site: its base op and weights, every node the passes inserted there (full
        names), and the values coming in and going out."""
        if path not in self.site_paths():
            raise _closest(path, self.site_paths(), "rewritten site")
        members = [n for n in self.graph.nodes if n.op != "output" and (
            n.meta.get("fxpeft_site") == path
            or (n.op == "get_attr" and str(n.target).rpartition(".")[0] == path)
            or ("fxpeft_rule" not in n.meta and _module_paths(n)[-1:] == [path]))]
        rows = [r for r in self.rows if r.path == path]
        title = f"site {path}: " + "; ".join(f"{r.method} ({_adapters_text(r, r.adapters)})" for r in rows)
        return self._picture(title, members, group=lambda n: None)

    def block(self, path: str) -> Picture:
        """One block (or any module): its base ops, runs of plain ops drawn as one box, and one box
        per rewritten site naming its method and adapters (``site(path)`` draws the inside)."""
        self._check_scope(path)
        members = [n for n in self.graph.nodes if n.op not in ("output", "placeholder") and self._in_scope(n, path)
                   and not (n.op == "get_attr" and "fxpeft_rule" not in n.meta)]
        rows = {r.path: r for r in self.rows}

        def group(node):
            site = node.meta.get("fxpeft_site")
            return f"site:{site}" if site in rows else None

        def hidden(node):  # base weights (each linear box names its module) and shape plumbing (sizes)
            value = node.meta.get("val")
            return (node.op == "get_attr" and "fxpeft_rule" not in node.meta) or (
                value is not None and not isinstance(value, torch.Tensor))

        return self._picture(f"block {path}", members, group, collapse_chains=True, rows=rows, hidden=hidden)

    def summary(self, adapter: Optional[str] = None) -> Picture:
        """The whole model in model order, blocks collapsed: a box per block (runs of alike blocks
        drawn once) holding one box per rewritten site with method, adapter and rank; rewritten
        sites and modules with weights outside blocks get a box each."""
        rows = [r for r in self.rows if adapter is None or adapter in r.adapters]
        by_path: dict = {}
        for row in rows:
            by_path.setdefault(row.path, []).append(row)
        # a flat graph (prefix tuning) still has the model's repeated blocks in its module tree
        blocks = list(self.gm._fxpeft_block_paths) or find_block_paths(self.gm)
        first_any: dict = {}  # (kind, path) -> index of its first node
        first_base: dict = {}  # ... of its first base node: inserted gate reads may come long before
        modules = dict(self.gm.named_modules())
        for index, node in enumerate(self.graph.nodes):
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            paths = _module_paths(node)
            site = node.meta.get("fxpeft_site")
            block = next((b for b in blocks if (site and _inside(site, b)) or any(_inside(p, b) for p in paths)), None)
            if block is not None:
                unit = ("block", block)
            elif site is not None and site in by_path:
                unit = ("site", site)
            elif paths and paths[-1] in by_path:
                unit = ("site", paths[-1])
            elif paths and paths[-1] in modules and next(modules[paths[-1]].parameters(recurse=False), None) is not None:
                unit = ("module", paths[-1])
            else:
                continue
            first_any.setdefault(unit, index)
            if "fxpeft_rule" not in node.meta:
                first_base.setdefault(unit, index)
        picture = Picture(f"{type(self.gm._fxpeft_source).__name__}" + (f": adapter {adapter!r}" if adapter else "")
                          + f" — {len(by_path)} rewritten sites")
        inputs = [n.name for n in self.graph.nodes if n.op == "placeholder"]
        picture.boxes["inputs"] = Box(["inputs", ", ".join(inputs)], "outside")
        previous = "inputs"
        order = sorted(first_any, key=lambda unit: first_base.get(unit, first_any[unit]))
        for key, (kind, path) in enumerate(self._runs(order, by_path, adapter)):
            picture.boxes[key] = self._unit_box(kind, path, by_path, adapter)
            picture.edges.append((previous, key))
            previous = key
        picture.boxes["output"] = Box(["output"], "outside")
        picture.edges.append((previous, "output"))
        return picture

    def adapter(self, name: str) -> Picture:
        """Where one adapter sits: the summary with only that adapter's sites and ranks."""
        if name not in self.gm.peft_config:
            raise _closest(name, self.gm.peft_config, "adapter")
        return self.summary(adapter=name)

    # ------------------------------------------------------------------ building pictures

    def _block_rows(self, block: str, by_path: dict, adapter: Optional[str]) -> list:
        """(path inside the block, 'method  adapter rank ...') for each rewritten site in it."""
        out = []
        for path, rows in by_path.items():
            if _inside(path, block):
                for row in rows:
                    names = [adapter] if adapter else row.adapters
                    out.append((path[len(block) + 1:], f"{row.method} ({_adapters_text(row, names)})"))
        return sorted(out)

    def _runs(self, units: list, by_path: dict, adapter) -> list:
        """Consecutive blocks whose rewritten sites are alike become one unit ('block', [paths])."""
        out: list = []
        for kind, path in units:
            if (kind == "block" and out and out[-1][0] == "block"
                    and self._block_rows(out[-1][1][0], by_path, adapter) == self._block_rows(path, by_path, adapter)
                    and type(self.gm.get_submodule(out[-1][1][0])) is type(self.gm.get_submodule(path))):
                out[-1][1].append(path)
            else:
                out.append((kind, [path] if kind == "block" else path))
        return out

    def _unit_box(self, kind: str, path, by_path: dict, adapter) -> Box:
        if kind == "block":
            first, last = path[0], path[-1]
            module = self.gm.get_submodule(first)
            cls = getattr(module, "block_class", type(module).__name__)  # a Block: the model's class it replaced
            head = first if len(path) == 1 else f"{first} … {last}"
            count = f"{len(path)} blocks" if len(path) > 1 else "block"
            rows = [(f"{inner}: {text}", "inserted") for inner, text in self._block_rows(first, by_path, adapter)]
            return Box([head, f"{count} ({cls})"], "base", rows)
        if kind == "site":
            texts = [f"{r.method} ({_adapters_text(r, [adapter] if adapter else r.adapters)})" for r in by_path[path]]
            return Box([path, *texts], "inserted")
        return Box([path, type(self.gm.get_submodule(path)).__name__], "base")

    def _picture(self, title: str, members: list, group, collapse_chains: bool = False,
                 rows: Optional[dict] = None, hidden=lambda node: False) -> Picture:
        """Boxes for ``members`` (nodes in graph order), merged by ``group(node)`` (a key, or None for
        a box of its own) and, with ``collapse_chains``, along runs of single-use plain ops of one
        module; plus a box per value flowing in from, or out to, the rest of the graph, except
        inputs ``hidden`` leaves out."""
        import networkx as nx

        inside = set(members)
        key = {n: group(n) or n.name for n in members}
        if collapse_chains:
            for node in members:  # a plain op whose only input is a plain op of the same module, used only here
                sources = [s for s in node.all_input_nodes if s in inside]
                if (len(sources) == 1 and len([s for s in node.all_input_nodes if not hidden(s)]) == 1 and group(node) is None
                        and group(sources[0]) is None and len(sources[0].users) == 1
                        and _module_paths(node)[-1:] == _module_paths(sources[0])[-1:]):
                    key[node] = key[sources[0]]
        edges = {(key[s], key[n]) for n in members for s in n.all_input_nodes if s in inside and key[s] != key[n]}
        if not nx.is_directed_acyclic_graph(nx.DiGraph(list(edges))):  # merging made a cycle: draw every node
            key = {n: n.name for n in members}
        picture = Picture(title)
        grouped: dict = {}
        for node in members:
            grouped.setdefault(key[node], []).append(node)
        for node in members:
            for source in node.all_input_nodes:
                if source not in inside and not hidden(source):
                    picture.boxes.setdefault(f"in:{source.name}", Box(self._outside_label(source), "outside"))
                    picture.edges.append((f"in:{source.name}", key[node]))
            if key[node] not in picture.boxes:
                picture.boxes[key[node]] = self._group_box(key[node], grouped[key[node]], rows or {})
            for source in node.all_input_nodes:
                if source in inside and key[source] != key[node]:
                    picture.edges.append((key[source], key[node]))
        for node in members:
            outside_users = [u for u in node.users if u not in inside]
            if outside_users:
                out = f"out:{node.name}"
                picture.boxes[out] = Box(["used outside: " + ", ".join(u.name for u in outside_users[:3])
                                          + (" …" if len(outside_users) > 3 else "")], "outside")
                picture.edges.append((key[node], out))
        picture.edges = list(dict.fromkeys(picture.edges))
        return picture

    def _outside_label(self, node: torch.fx.Node) -> list:
        if node.op == "placeholder":
            return [f"input {node.name}"]
        if node.op == "get_attr":
            return [str(node.target)]
        paths = _module_paths(node)
        if paths and paths[-1]:
            return [node.name, f"from {paths[-1]}"]
        state = [str(s.target) for s in node.all_input_nodes if s.op == "get_attr"]  # e.g. the adapter gates
        return [node.name] + ([f"reads {', '.join(state)}"] if state else [])

    def _group_box(self, key: str, nodes: list, rows: dict) -> Box:
        if key.startswith("site:"):
            path = key[len("site:"):]
            texts = [f"{r.method} ({_adapters_text(r, r.adapters)})" for r in self.rows if r.path == path]
            return Box([path, *texts, f"{len(nodes)} inserted nodes: report.site({path!r})"], "inserted")
        kind = "inserted" if "fxpeft_rule" in nodes[0].meta else "base"
        if nodes[0].op == "get_attr":
            return Box([str(nodes[0].target)], kind)
        ops = " → ".join(_op_name(n) for n in nodes)
        paths = _module_paths(nodes[0])
        where = paths[-1] if paths and paths[-1] else None
        if kind == "inserted":
            return Box([ops, f"{nodes[0].meta['fxpeft_rule']} · {nodes[0].name}"], kind)
        return Box([ops] + ([where] if where else []), kind)


def inspect(gm) -> Report:
    """What fxpeft did to ``gm`` (the result of :func:`fxpeft.transform`): print it for the table
    of rewritten sites; ``.summary()``, ``.site(path)``, ``.block(path)``, ``.adapter(name)``
    return pictures to ``.save("pic.svg")``; ``.diff(scope)`` shows the code before and after."""
    return Report(gm)
