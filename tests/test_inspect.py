"""Graph inspection: the site table, DOT, networkx and the before/after diff."""
from __future__ import annotations

import torch

import fxpeft
import models


def test_report_lists_every_rewritten_site():
    model = models.llama().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    report = fxpeft.inspect(gm)
    paths = {row.path for row in report.rows}
    assert paths == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    q = next(r for r in report.rows if r.path == "model.layers.0.self_attn.q_proj")
    assert q.method == "lora" and q.adapters == ["default"] and "r=4" in q.shape
    assert q.params == 4 * 32 + 32 * 4
    text = str(report)
    assert "model.layers.1.self_attn.v_proj" in text
    assert f"{fxpeft.trainable_parameters(gm)[0]:,d} trainable" in text


def test_dot_networkx_and_diff_mark_inserted_nodes():
    model = models.MLP()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
    report = fxpeft.inspect(gm)
    graph = report.to_networkx()
    inserted = {n for n, data in graph.nodes(data=True) if data["inserted"]}
    assert inserted and all(graph.nodes[n]["site"] == "fc1" for n in inserted
                            if graph.nodes[n]["rule"] != "adapter_gates")
    assert {graph.nodes[n]["rule"] for n in inserted} == {"lora", "adapter_gates"}
    base_nodes = {n for n, data in graph.nodes(data=True) if not data["inserted"]}
    assert {n.name for n in gm._fxpeft_signatures[None].canonical.nodes} == base_nodes
    dot = report.to_dot()
    assert dot.startswith("digraph") and dot.count("fillcolor") == len(inserted)
    diff = report.diff()
    added = [line for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]
    assert any("lora_A" in line for line in added) and any("lora_B" in line for line in added)
    assert not any(line.startswith("-") and "fc2" in line for line in diff.splitlines())


def test_modules_to_save_shows_in_report():
    model = models.bert().eval()
    gm = fxpeft.transform(model, fxpeft.LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    rows = {r.path: r for r in fxpeft.inspect(gm).rows}
    assert rows["classifier"].method == "modules_to_save"
    assert rows["classifier"].params == sum(p.numel() for p in model.classifier.parameters())
