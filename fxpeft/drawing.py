"""Pictures of small graphs: boxes with full names, coloured by what they are, and a legend.

A :class:`Picture` renders to DOT, SVG and PNG. Graphviz's ``dot`` lays it out where it is
installed; otherwise a small layered layout written here draws the SVG (PNG needs ``dot``:
nothing in fxpeft's dependencies rasterises text). Inspection (fxpeft/inspection.py) builds the
pictures; this file knows nothing of fxpeft's graphs.
"""
from __future__ import annotations

import html
import os
import shutil
import subprocess
from dataclasses import dataclass, field

# kind -> (fill colour, legend text)
KINDS = {
    "base": ("#e9e9e9", "base model (unchanged)"),
    "inserted": ("#ffcf70", "inserted by fxpeft"),
    "outside": ("#cfe2ff", "graph input / output, or a value from outside this view"),
}
FONT_SIZE = 11
CHAR_W = FONT_SIZE * 0.62  # monospace advance, generous so text stays inside its box
LINE_H = FONT_SIZE + 4
INSTALL_GRAPHVIZ = ("install Graphviz, which provides the `dot` program: `apt-get install graphviz` (Debian/Ubuntu), "
                    "`brew install graphviz` (macOS) or `conda install graphviz`")


@dataclass
class Box:
    """One box: text lines (the first is bold), a kind (a key of KINDS), and optional rows drawn as
    boxes of their own inside it (``(text, kind)``), e.g. the rewritten sites of a block."""

    lines: list
    kind: str = "base"
    rows: list = field(default_factory=list)


@dataclass
class Picture:
    """Boxes (by id, in order) and edges between them, with a title. ``save`` picks the format
    from the file name: ``.svg``, ``.png`` or ``.dot``."""

    title: str
    boxes: dict = field(default_factory=dict)
    edges: list = field(default_factory=list)

    def to_dot(self) -> str:
        """Graphviz DOT text: full names, colours by kind, a legend cluster."""
        lines = ["digraph fxpeft {", f'  label=<{html.escape(self.title)}>; labelloc=t; fontname="monospace";',
                 f'  node [shape=plain, fontname="monospace", fontsize={FONT_SIZE}];', '  edge [color="#555555"];']
        ids = {key: f"n{i}" for i, key in enumerate(self.boxes)}
        for key, box in self.boxes.items():
            lines.append(f"  {ids[key]} [label=<{_html_table(box)}>];")
        for source, target in self.edges:
            lines.append(f"  {ids[source]} -> {ids[target]};")
        legend = "".join(f'<TR><TD BGCOLOR="{KINDS[k][0]}">  </TD><TD ALIGN="LEFT">{html.escape(KINDS[k][1])}</TD></TR>'
                         for k in self._kinds())
        lines.append('  subgraph cluster_legend { label="legend"; style=dashed; '
                     f'legend [label=<<TABLE BORDER="0" CELLSPACING="2">{legend}</TABLE>>]; }}')
        lines.append("}")
        return "\n".join(lines)

    def to_svg(self, engine: str = "auto") -> str:
        """SVG text, laid out by Graphviz (``engine="dot"``), by fxpeft's own layout
        (``"python"``), or by ``dot`` where installed (``"auto"``)."""
        if _use_dot(engine):
            return _run_dot(self.to_dot(), "svg").decode()
        return _SvgLayout(self).svg()

    def to_png(self, engine: str = "auto") -> bytes:
        """PNG bytes from Graphviz's ``dot``; without it, a RuntimeError saying how to install it."""
        if engine == "python" or not _use_dot(engine):
            raise RuntimeError(f"Writing a PNG needs Graphviz's `dot`, which is not installed: {INSTALL_GRAPHVIZ}. "
                               "Or save as .svg, which needs nothing (any browser shows it).")
        return _run_dot(self.to_dot(), "png")

    def save(self, path: str, engine: str = "auto") -> str:
        """Write the picture to ``path`` (.svg, .png or .dot); returns the path."""
        suffix = os.path.splitext(path)[1].lower()
        if suffix == ".svg":
            data = self.to_svg(engine).encode()
        elif suffix == ".png":
            data = self.to_png(engine)
        elif suffix in (".dot", ".gv"):
            data = self.to_dot().encode()
        else:
            raise ValueError(f"Cannot tell the picture format from {path!r}: name the file .svg, .png or .dot.")
        with open(path, "wb") as handle:
            handle.write(data)
        return path

    def _kinds(self) -> list:
        used = {box.kind for box in self.boxes.values()} | {k for box in self.boxes.values() for _, k in box.rows}
        return [kind for kind in KINDS if kind in used]

    def __repr__(self) -> str:
        return f"<Picture {self.title!r}: {len(self.boxes)} boxes, {len(self.edges)} edges; .save('pic.svg')>"


def _html_table(box: Box) -> str:
    colour = KINDS[box.kind][0]
    text = "<BR/>".join(f"<B>{html.escape(line)}</B>" if i == 0 else html.escape(line)
                        for i, line in enumerate(box.lines))
    rows = "".join(f'<TR><TD BGCOLOR="{KINDS[kind][0]}" ALIGN="LEFT">{html.escape(row)}</TD></TR>'
                   for row, kind in box.rows)
    return (f'<TABLE BORDER="1" CELLBORDER="{1 if rows else 0}" CELLSPACING="{3 if rows else 0}" CELLPADDING="4" '
            f'BGCOLOR="{colour}"><TR><TD>{text}</TD></TR>{rows}</TABLE>')


def _use_dot(engine: str) -> bool:
    if engine not in ("auto", "dot", "python"):
        raise ValueError(f"engine must be 'auto', 'dot' or 'python', got {engine!r}.")
    if engine == "dot" and shutil.which("dot") is None:
        raise RuntimeError(f"engine='dot' needs Graphviz's `dot`, which is not installed: {INSTALL_GRAPHVIZ}.")
    return engine == "dot" or (engine == "auto" and shutil.which("dot") is not None)


def _run_dot(dot: str, fmt: str) -> bytes:
    done = subprocess.run(["dot", f"-T{fmt}"], input=dot.encode(), capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"Graphviz's dot failed: {done.stderr.decode().strip()}")
    return done.stdout


class _SvgLayout:
    """A layered drawing without Graphviz: each box on the layer after its deepest input, boxes
    in a layer ordered by the mean position of their inputs (a few sweeps), edges as curves."""

    GAP_X, GAP_Y, PAD = 24, 36, 6

    def __init__(self, picture: Picture):
        self.picture = picture
        keys = list(picture.boxes)
        inputs = {k: [] for k in keys}
        for source, target in picture.edges:
            inputs[target].append(source)
        layer: dict = {}
        for key in keys:  # boxes come in graph order: inputs before users
            layer[key] = 1 + max((layer[s] for s in inputs[key] if s in layer), default=-1)
        self.layers = [[k for k in keys if layer[k] == i] for i in range(max(layer.values(), default=-1) + 1)]
        position = {k: i for row in self.layers for i, k in enumerate(row)}
        for _ in range(3):  # barycentre ordering: fewer crossings
            for row in self.layers[1:]:
                row.sort(key=lambda k: sum(position[s] for s in inputs[k]) / len(inputs[k]) if inputs[k] else position[k])
                position.update({k: i for i, k in enumerate(row)})
        self.size = {k: self._box_size(picture.boxes[k]) for k in keys}

    @staticmethod
    def _box_size(box: Box) -> tuple:
        texts = list(box.lines) + [row for row, _ in box.rows]
        width = max(len(t) for t in texts) * CHAR_W + 2 * _SvgLayout.PAD + (8 if box.rows else 0)
        height = len(box.lines) * LINE_H + 2 * _SvgLayout.PAD + len(box.rows) * (LINE_H + 8)
        return width, height

    def svg(self) -> str:
        title_h = LINE_H * 2
        widths = [sum(self.size[k][0] for k in row) + self.GAP_X * (len(row) - 1) for row in self.layers]
        legend = self.picture._kinds()
        legend_w = max([len(KINDS[k][1]) for k in legend] + [6]) * CHAR_W + 40
        total_w = max(widths + [len(self.picture.title) * CHAR_W]) + 2 * self.GAP_X + legend_w
        place, y = {}, title_h + self.GAP_Y / 2
        for row, width in zip(self.layers, widths):
            x = self.GAP_X + (total_w - legend_w - 2 * self.GAP_X - width) / 2
            height = max(self.size[k][1] for k in row)
            for key in row:
                place[key] = (x, y)
                x += self.size[key][0] + self.GAP_X
            y += height + self.GAP_Y
        total_h = max(y, title_h + (len(legend) + 2) * LINE_H * 1.5)
        out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{total_w:.0f}" height="{total_h:.0f}" '
               f'viewBox="0 0 {total_w:.0f} {total_h:.0f}" font-family="monospace" font-size="{FONT_SIZE}">',
               '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
               'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>',
               '<rect width="100%" height="100%" fill="white"/>',
               f'<text x="{self.GAP_X}" y="{LINE_H * 1.2:.1f}" font-weight="bold">{html.escape(self.picture.title)}</text>']
        for source, target in self.picture.edges:
            (sx, sy), (tx, ty) = place[source], place[target]
            x1, y1 = sx + self.size[source][0] / 2, sy + self.size[source][1]
            x2, y2 = tx + self.size[target][0] / 2, ty
            mid = (y1 + y2) / 2
            out.append(f'<path d="M {x1:.1f} {y1:.1f} C {x1:.1f} {mid:.1f} {x2:.1f} {mid:.1f} {x2:.1f} {y2:.1f}" '
                       'fill="none" stroke="#555" marker-end="url(#arrow)"/>')
        for key, box in self.picture.boxes.items():
            out.extend(self._draw_box(box, *place[key], *self.size[key]))
        lx, ly = total_w - legend_w + 8, title_h
        out.append(f'<text x="{lx:.1f}" y="{ly:.1f}" font-weight="bold">legend</text>')
        for i, kind in enumerate(legend):
            row_y = ly + (i + 0.6) * LINE_H * 1.5
            out.append(f'<rect x="{lx:.1f}" y="{row_y:.1f}" width="18" height="{LINE_H}" fill="{KINDS[kind][0]}" '
                       'stroke="#333"/>')
            out.append(f'<text x="{lx + 26:.1f}" y="{row_y + LINE_H - 4:.1f}">{html.escape(KINDS[kind][1])}</text>')
        out.append("</svg>")
        return "\n".join(out)

    def _draw_box(self, box: Box, x: float, y: float, w: float, h: float) -> list:
        pad = self.PAD
        out = [f'<rect x="{x:.1f}" y="{y:.1f}" width="{w:.1f}" height="{h:.1f}" rx="3" fill="{KINDS[box.kind][0]}" '
               'stroke="#333"/>']
        for i, line in enumerate(box.lines):
            weight = ' font-weight="bold"' if i == 0 else ""
            out.append(f'<text x="{x + pad:.1f}" y="{y + pad + (i + 1) * LINE_H - 4:.1f}"{weight}>'
                       f'{html.escape(line)}</text>')
        row_y = y + pad + len(box.lines) * LINE_H + 4
        for row, kind in box.rows:
            out.append(f'<rect x="{x + pad:.1f}" y="{row_y:.1f}" width="{w - 2 * pad:.1f}" height="{LINE_H + 4}" '
                       f'fill="{KINDS[kind][0]}" stroke="#333"/>')
            out.append(f'<text x="{x + pad + 4:.1f}" y="{row_y + LINE_H:.1f}">{html.escape(row)}</text>')
            row_y += LINE_H + 8
        return out

