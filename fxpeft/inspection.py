"""What a pass did to a graph: a per-site table, Graphviz DOT, networkx, and a before/after diff.

Every node a rule inserts carries ``meta["fxpeft_rule"]`` (and ``meta["fxpeft_site"]`` for site
rules), stamped by the driver, so the report reads the graph itself rather than bookkeeping. It
reads the whole model as one graph with full module paths: the flat canonical graph lowered with
the module's adapter state, which is what the top graph and its blocks (fxpeft/blocks.py) run.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch.fx
from torch import nn

from .registry import registry_of
from .rewrite import lower
from .state import adapter_modules


@dataclass
class SiteRow:
    path: str
    method: str
    adapters: list
    shape: str
    params: int  # adapter parameters at this site (trainable or not)


class Report:
    def __init__(self, gm):
        self.gm = gm
        self.canonical = gm._fxpeft_signatures[gm._fxpeft_primary].canonical
        self.graph = lower(self.canonical, gm, registry_of(gm)) if gm._fxpeft_block_paths else gm.graph
        self.rows = self._rows()

    def _rows(self) -> list[SiteRow]:
        rewritten = {(n.meta["fxpeft_site"], n.meta["fxpeft_rule"]) for n in self.graph.nodes if n.meta.get("fxpeft_site")}
        is_adapter_state = registry_of(self.gm).is_adapter_state
        described = {}  # path -> what the methods say of their adapters there ("r=8")
        for path, module, method, adapter in adapter_modules(self.gm, list(self.gm.peft_config)):
            if method.describe is not None:
                described.setdefault(path, set()).add(method.describe(module, adapter))
        rows = []
        for path, rule in sorted(rewritten):
            module = self.gm.get_submodule(path)
            adapters = {key for name, child in module.named_children() if is_adapter_state(name)
                        and isinstance(child, (nn.ModuleDict, nn.ParameterDict)) for key in child.keys()}
            params = sum(p.numel() for name, p in module.named_parameters() if is_adapter_state(name))
            ranks = described.get(path, set())
            weight = getattr(module, "weight_spec", None) or getattr(module, "weight", None)  # quantized: logical
            shape = "x".join(map(str, weight.shape)) if weight is not None else "-"
            shape += f" {module.storage}" if hasattr(module, "storage") else ""
            rows.append(SiteRow(path, rule, sorted(adapters), f"{shape} {' '.join(sorted(ranks))}".strip(), params))
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

    def to_networkx(self):
        import networkx as nx

        graph = nx.DiGraph()
        for node in self.graph.nodes:
            graph.add_node(node.name, op=node.op, target=str(node.target), inserted="fxpeft_rule" in node.meta,
                           rule=node.meta.get("fxpeft_rule"), site=node.meta.get("fxpeft_site"))
            for source in node.all_input_nodes:
                graph.add_edge(source.name, node.name)
        return graph

    def to_dot(self) -> str:
        lines = ["digraph fxpeft {", "  node [shape=box, fontname=monospace, fontsize=10];"]
        for node in self.graph.nodes:
            label = f"{node.name}\\n{node.op}: {str(node.target)[:60]}".replace('"', "'")
            style = ', style=filled, fillcolor="#ffd580"' if "fxpeft_rule" in node.meta else ""
            lines.append(f'  "{node.name}" [label="{label}"{style}];')
        for node in self.graph.nodes:
            for source in node.all_input_nodes:
                lines.append(f'  "{source.name}" -> "{node.name}";')
        lines.append("}")
        return "\n".join(lines)

    def diff(self, context: int = 1) -> str:
        """Unified diff of the generated code: the canonical graph before the passes, after them."""
        before = self.canonical.python_code("self").src.splitlines()
        after = self.graph.python_code("self").src.splitlines()
        return "\n".join(difflib.unified_diff(before, after, "canonical", "rewritten", n=context, lineterm=""))


def inspect(gm) -> Report:
    return Report(gm)
