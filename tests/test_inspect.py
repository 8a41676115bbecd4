"""Graph inspection: the site table, scoped pictures (SVG / PNG), DOT, networkx, the before/after
diff, and the progress shown while transforming."""
from __future__ import annotations

import contextlib
import html
import io
import os
import re
import shutil

import pytest

import fxpeft
import models
from fxpeft import progress

Q0, V0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


@contextlib.contextmanager
def progress_env(value):
    old = os.environ.get("FXPEFT_PROGRESS")
    os.environ["FXPEFT_PROGRESS"] = value
    try:
        yield
    finally:
        os.environ.pop("FXPEFT_PROGRESS") if old is None else os.environ.__setitem__("FXPEFT_PROGRESS", old)


@pytest.fixture(scope="module")
def llama():
    """A tiny Llama with two LoRA adapters ("other" only on v_proj), transformed with progress
    forced on: (report, what the transform wrote to stderr)."""
    err = io.StringIO()
    with progress_env("1"), contextlib.redirect_stderr(err):
        gm = fxpeft.transform(models.llama().eval(), fxpeft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    fxpeft.add_adapter(gm, fxpeft.LoraConfig(r=2, target_modules=["v_proj"]), "other")
    return fxpeft.inspect(gm), err.getvalue()


def test_report_lists_every_rewritten_site(llama):
    report, _ = llama
    paths = {row.path for row in report.rows}
    assert paths == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    q = next(r for r in report.rows if r.path == Q0)
    assert q.method == "lora" and q.adapters == ["default"] and "r=4" in q.shape
    assert q.params == 4 * 32 + 32 * 4
    v = next(r for r in report.rows if r.path == V0)
    assert v.adapters == ["default", "other"] and v.ranks == {"default": "r=4", "other": "r=2"}
    text = str(report)
    assert "model.layers.1.self_attn.v_proj" in text
    assert f"{fxpeft.trainable_parameters(report.gm)[0]:,d} trainable" in text


def test_progress_names_each_step_and_is_quiet_unless_asked(llama):
    _, shown = llama
    for step in ("fxpeft.transform: capturing", "canonicalizing", "lowering block 2/2", "attaching lora"):
        assert step in shown
    for setting in ("0", ""):  # asked to be quiet; unset and stderr not a terminal
        err = io.StringIO()
        with progress_env(setting), contextlib.redirect_stderr(err):
            fxpeft.transform(models.MLP(), fxpeft.LoraConfig(r=2, target_modules=["fc1"]))
        assert err.getvalue() == "" and not progress.enabled()


def _svg_size(svg: str) -> tuple:
    width, height = (float(re.search(rf'{dim}="([0-9.]+)(?:pt|px)?"', svg).group(1)) for dim in ("width", "height"))
    return width, height


VIEWS = {  # view -> (names the picture must show, names it must not, size bound in px)
    "summary": (lambda r: r.summary(), ["model.layers.0 … model.layers.1", "self_attn.q_proj: lora (default r=4)",
                                        "self_attn.v_proj: lora (default r=4, other r=2)", "model.embed_tokens",
                                        "lm_head"], [], 2500),
    "site": (lambda r: r.site(Q0), [f"{Q0}.weight", f"{Q0}.lora_A.default.weight", f"{Q0}.lora_B.default.weight",
                                    f"{Q0}.lora_scaling.default.value", "from model.layers.0.input_layernorm"],
             [V0, "other"], 3000),
    "block": (lambda r: r.block("model.layers.1"), ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                                    "lora (default r=4, other r=2)"], [Q0, V0], 6000),
    "adapter": (lambda r: r.adapter("other"), ["self_attn.v_proj: lora (other r=2)"], ["q_proj", "default r=4"], 2500),
}


@pytest.mark.parametrize("engine", ["python", "auto"])
@pytest.mark.parametrize("view", list(VIEWS))
def test_each_view_renders_a_bounded_svg_with_full_names(llama, tmp_path, view, engine):
    build, present, absent, bound = VIEWS[view]
    path = build(llama[0]).save(str(tmp_path / "pic.svg"), engine=engine)
    svg = open(path).read()
    text = " ".join(html.unescape(svg).replace("\xa0", " ").split())
    assert svg.lstrip().startswith(("<svg", "<?xml")) and len(svg) < 200_000
    assert all(0 < size < bound for size in _svg_size(svg))
    for name in present + ["inserted by fxpeft", "base model (unchanged)"]:  # full names; the legend
        assert name in text, name
    for name in absent:
        assert name not in text, name
    assert "#ffcf70" in svg.lower() and "#e9e9e9" in svg.lower()  # inserted and base drawn apart


def test_png_with_graphviz_or_an_error_naming_it(llama, tmp_path):
    picture = llama[0].site(Q0)
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        picture.save(str(tmp_path / "pic.png"), engine="python")
    if shutil.which("dot"):
        data = open(picture.save(str(tmp_path / "pic.png")), "rb").read()
        assert data.startswith(b"\x89PNG") and 1_000 < len(data) < 1_000_000
    else:
        with pytest.raises(RuntimeError, match="Graphviz"):
            picture.save(str(tmp_path / "pic.png"))
    dot = open(picture.save(str(tmp_path / "pic.dot")), encoding="utf-8").read()
    assert dot.startswith("digraph") and f"{Q0}.lora_B.default.weight" in dot
    with pytest.raises(ValueError, match=".svg, .png or .dot"):
        picture.save(str(tmp_path / "pic.jpg"))


def test_bad_scope_names_the_closest(llama):
    report, _ = llama
    with pytest.raises(KeyError, match="model.layers.0.self_attn.q_proj"):
        report.site("model.layers.0.self_attn.q_prj")
    with pytest.raises(KeyError, match="No rewritten site 'no.such.path'"):
        report.site("no.such.path")
    with pytest.raises(KeyError, match="model.layers.1"):
        report.block("model.layer.1")
    with pytest.raises(KeyError, match="default"):
        report.adapter("defualt")


def test_diff_for_one_site_or_block(llama):
    report, _ = llama
    site = report.diff(Q0).splitlines()
    added = [line for line in site if line.startswith("+") and not line.startswith("+++")]
    assert any(f"{Q0}.lora_A.default.weight" in line for line in added)
    assert not any("v_proj" in line for line in site)
    assert not any(line.startswith("-") and not line.startswith("---") for line in site)
    block = report.diff("model.layers.1")
    assert "model.layers.1.self_attn.q_proj.lora_B.default.weight" in block and "model.layers.0." not in block
    # v_proj reads both adapters through one slot-selecting call on its module (which adapters it holds is
    # read when it runs, so that loading another leaves this code as it is)
    assert re.search(r"lora_slots\(\w+, model_layers_1_self_attn_v_proj, \w+, '[\w.]*v_proj', "
                     r"_fxpeft_slots\)", block)


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
    report = fxpeft.inspect(gm)
    rows = {r.path: r for r in report.rows}
    assert rows["classifier"].method == "modules_to_save"
    assert rows["classifier"].params == sum(p.numel() for p in model.classifier.parameters())
    # in model order, though the copy's selection reads the adapter gates at the top of the graph
    heads = [box.lines[0] for box in report.summary().boxes.values()]
    assert heads[-4:] == ["bert.encoder.layer.0 … bert.encoder.layer.1", "bert.pooler.dense", "classifier", "output"]
    assert "classifier.modules_to_save.default.weight" in report.site("classifier").to_svg(engine="python")
