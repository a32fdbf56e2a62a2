"""reports/index.html: the optimisation report of one bench run, as one self-contained page.

Per engine: graph before/after the runtime's fusion (node and kernel counts, the fused chains by
name, from the engine's fusion.json), where the SSDDecodeNMS node sits (source_graph.json), INT8
activation histograms only where the quantization metadata recorded them; then the latency/mAP
table and the Pareto plot. Images are base64-embedded: the file opens anywhere, offline.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from ssdopt.evaluate.bench_output import COLUMNS, cell
from ssdopt.fileio import atomic_write

STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}code{font-size:12px}
.engine{border-top:2px solid #888;margin-top:2em}"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(header: list[str], rows: list[list[str]], css: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _png(path: Path, alt: str) -> str:
    if not path.is_file():
        return f"<p>{_e(alt)}: not produced.</p>"
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def decode_node_position(engine_dir: Path) -> str:
    """Where SSDDecodeNMS sits in the graph the runtime consumed, and what feeds it."""
    graph_path = engine_dir / "source_graph.json"
    if not graph_path.is_file():
        return "no source graph recorded"
    nodes = json.loads(graph_path.read_text())
    for index, node in enumerate(nodes):
        if node.get("op_type") == "SSDDecodeNMS":
            producers = {o: n["name"] for n in nodes for o in n.get("outputs", [])}
            feeds = ", ".join(f"{i} (from {producers.get(i, 'initializer')})" for i in node["inputs"])
            return (
                f"node {index + 1} of {len(nodes)} ({node['name']}, domain {node.get('domain')}): "
                f"inputs {feeds}; outputs {', '.join(node['outputs'])}"
            )
    return "not in this graph: head outputs are decoded by the reference implementation in Python"


def _histograms(metadata: dict[str, Any]) -> str:
    """Activation histograms with chosen ranges, only if the build recorded them (never invented)."""
    quant = metadata.get("quantization") or {}
    recorded = quant.get("histograms")
    if not recorded:
        if metadata.get("precision") == "int8":
            return "<p>INT8 activation histograms: not recorded in this engine's quantization metadata.</p>"
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    parts = ["<h4>INT8 activation histograms (most sensitive layers)</h4>"]
    for name, item in list(recorded.items())[:6]:
        fig, ax = plt.subplots(figsize=(5, 2.4), dpi=90)
        edges, counts = item["edges"], item["counts"]
        ax.stairs(counts, edges)
        for bound in item.get("range", []):
            ax.axvline(bound, color="tab:red")
        ax.set_title(name, fontsize=8)
        ax.set_yscale("log")
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png")
        plt.close(fig)
        data = base64.b64encode(buffer.getvalue()).decode()
        parts.append(f'<img alt="histogram {_e(name)}" src="data:image/png;base64,{data}">')
    return "".join(parts)


def engine_section(row: dict[str, Any]) -> str:
    """One engine: fusion before/after, fused chains, SSDDecodeNMS position, histograms."""
    path = Path(row["engine"])
    title = (
        f"{row['backend']} {row['precision']} — {row['graph']} {row['status']} {row.get('status_name', '')}"
    )
    parts = [f'<div class="engine"><h3>{_e(title)}</h3><p><code>{_e(path)}</code></p>']
    fusion_path = path / "fusion.json"
    if fusion_path.is_file():
        fusion = json.loads(fusion_path.read_text())
        before, after = fusion.get("before", {}), fusion.get("after", {})
        parts.append(
            _table(
                ["graph", "nodes / kernels", "BatchNorm nodes", "Conv-BN-act chains", "by type"],
                [
                    [
                        "before fusion (unfolded export)",
                        before.get("nodes"),
                        before.get("batchnorm_nodes"),
                        before.get("conv_bn_act_chains"),
                        "",
                    ],
                    [
                        "after fusion (runtime layers)",
                        after.get("layers"),
                        "",
                        "",
                        ", ".join(f"{k} {v}" for k, v in sorted(after.get("by_type", {}).items())),
                    ],
                ],
                "fusion",
            )
        )
        chains = [
            [
                c.get("conv"),
                c.get("bn"),
                f"{c.get('activation')} ({c.get('activation_type')})",
                c.get("status"),
                ", ".join(c.get("runtime_layers", [])),
            ]
            for c in fusion.get("chains", [])
        ]
        if chains:
            parts.append(
                _table(["conv", "batchnorm", "activation", "status", "runtime layer(s)"], chains, "chains")
            )
    else:
        parts.append("<p>No fusion report in this engine directory.</p>")
    parts.append(f"<p><b>SSDDecodeNMS:</b> {_e(decode_node_position(path))}</p>")
    metadata_path = path / "metadata.json"
    if metadata_path.is_file():
        parts.append(_histograms(json.loads(metadata_path.read_text())))
    parts.append("</div>")
    return "".join(parts)


def render(rows: list[dict[str, Any]], context: dict[str, Any], reports: Path) -> str:
    machine = context.get("machine", {}).get("cpu", {}).get("name")
    # the status in words beside its mark: a browser without an emoji font shows the mark as a box
    shown = [
        [
            f"{cell(r, k)} {r.get('status_name', '')}".strip() if k == "status" else cell(r, k)
            for k, _ in COLUMNS
        ]
        for r in rows
    ]
    table = _table([t for _, t in COLUMNS], shown, "bench")
    engines = "".join(engine_section(r) for r in rows if r.get("engine") and Path(r["engine"]).is_dir())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>ssdopt report</title>"
        f"<style>{STYLE}</style></head><body><h1>ssdopt optimisation report</h1>"
        f"<p>{_e(context.get('date'))} · {_e(machine)} · model {_e(context.get('model'))} · "
        f"<code>{_e(context.get('command'))}</code></p>"
        f"<h2>Latency and accuracy</h2>{table}<h2>Pareto front</h2>"
        f"{_png(reports / 'pareto.png', 'Pareto plot: latency vs mAP')}"
        f"<h2>Engines</h2>{engines or '<p>No built engines.</p>'}</body></html>"
    )


def write_report(reports: Path) -> Path:
    """reports/index.html from reports/bench.json (+ bench_context.json, pareto.png); returns its path."""
    from ssdopt.errors import SsdoptError

    bench = reports / "bench.json"
    if not bench.is_file():
        raise SsdoptError(bench, "the rows of a bench run", "run `ssdopt bench` first")
    rows = json.loads(bench.read_text())
    context_path = reports / "bench_context.json"
    context = json.loads(context_path.read_text()) if context_path.is_file() else {}
    page = render(rows, context, reports)
    return atomic_write(reports / "index.html", lambda tmp: tmp.write_text(page, encoding="utf-8"))
