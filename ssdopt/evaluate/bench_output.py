"""The bench table as a user reads it: bench.json, bench.md, pareto.png and a rich table on stdout.

Every file is written atomically (temp file beside it, then rename).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ssdopt.fileio import atomic_write, write_json

COLUMNS = (
    ("backend", "backend"),
    ("precision", "precision"),
    ("graph", "graph"),
    ("status", "status"),
    ("size_mb", "size MB"),
    ("build_s", "build s"),
    ("map", "mAP"),
    ("delta_map", "ΔmAP (pts)"),
    ("agreement", "agreement"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("throughput_ips", "images/s"),
    ("speedup", "speed-up"),
    ("vs_best_peer", "vs best peer"),
    ("best_throughput_ips", "best img/s (batch)"),
)
FORMATS: dict[str, Callable[[Any], str]] = {
    "size_mb": "{:.1f}".format,
    "build_s": "{:.1f}".format,
    "map": "{:.3f}".format,
    "delta_map": "{:+.2f}".format,
    "agreement": "{:.3f}".format,
    "p50_ms": "{:.2f}".format,
    "p99_ms": "{:.2f}".format,
    "throughput_ips": "{:.1f}".format,
    "speedup": "{:.1f}x".format,
    "vs_best_peer": "{:.2f}x".format,
}


def cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key == "best_throughput_ips" and value is not None:
        streams = row.get("best_throughput_streams") or 1
        where = f"{row.get('best_throughput_batch')}" + (f", {streams} streams" if streams > 1 else "")
        return f"{value:.0f} ({where})"
    if value is None and key == "agreement" and row.get("delta_map") is not None:
        return "n/a"  # validated, but the reference had no confident detection to agree with
    if value is None:
        return "–"
    return FORMATS[key](value) if key in FORMATS else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = "| " + " | ".join(title for _, title in COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for row in rows:
        lines.append("| " + " | ".join(cell(row, key) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def markdown(rows: list[dict[str, Any]], context: dict[str, Any]) -> str:
    machine = context.get("machine", {})
    cpu = machine.get("cpu", {})
    plan = context.get("plan", {})
    reasons = [
        f"- {r['backend']} {r['precision']}: {r['status']} {r['reason']}" for r in rows if r.get("reason")
    ]
    legend = " · ".join(f"{k} {v}" for k, v in context.get("legend", {}).items())
    parts = [
        "# ssdopt bench",
        "",
        f"- date: {context.get('date')}",
        f"- machine: {cpu.get('name')} ({' '.join(cpu.get('flags', []))}), {machine.get('threads')} threads "
        f"(torch {machine.get('torch_threads')}), {machine.get('platform')}",
        f"- command: `{context.get('command') or 'run_bench(...)'}`",
        f"- model: {context.get('model')} ({context.get('checkpoint')}); dataset: {context.get('dataset')} "
        f"({context.get('images')} images); batch {context.get('batch')}",
        f"- timing: warm-up {plan.get('warmup_s')} s, then >= {plan.get('min_duration_s')} s and "
        f">= {plan.get('min_iterations')} iterations; end to end (pre-processed tensor -> detections)",
        f"- validation: ΔmAP vs ONNX Runtime fp32 >= -{context.get('budget_points')} points and agreement "
        f">= {context.get('min_agreement')}; speed-up vs "
        f"{context.get('speedup_baseline', 'torchvision eager fp32')} p50",
        f"- legend: {legend}",
        "",
        markdown_table(rows),
        "",
    ]
    if reasons:
        parts += ["## Reasons", "", *reasons, ""]
    if context.get("interleaved"):
        parts += interleaved_markdown(rows, context["interleaved"])
    if context.get("split"):
        parts += split_markdown(rows, context["split"])
    parts += ["![Pareto: latency vs mAP](pareto.png)", ""]
    return "\n".join(parts)


def _ratio(row: dict[str, Any], key: str) -> str:
    if row.get(f"{key}_median") is None:
        return "–"
    low, high = row[f"{key}_range"]
    return f"{row[f'{key}_median']:.2f}x ({low:.2f}–{high:.2f})"


def interleaved_markdown(rows: list[dict[str, Any]], summary: dict[str, Any]) -> list[str]:
    """Per-round ratios (bench.interleave): median and min–max over the rounds."""
    lines = [
        f"## Interleaved rounds ({summary['rounds']})",
        "",
        f"best peer: {summary.get('best_peer')}; our best engine: {summary.get('best_engine')}",
        "",
        "| backend | precision | graph | median of round p50 ms | vs best peer (min–max) "
        "| vs torchvision eager (min–max) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.get("rounds_ms"):
            lines.append(
                f"| {row['backend']} | {row['precision']} | {row['graph']} | {row['rounds_p50_ms']:.2f} | "
                f"{_ratio(row, 'vs_best_peer')} | {_ratio(row, 'speedup')} |"
            )
    return [*lines, ""]


def split_markdown(rows: list[dict[str, Any]], split: dict[str, Any]) -> list[str]:
    """The time split (bench.time_split) as a short section: what each part costs at the bench batch."""
    lines = [
        "## Where the time goes",
        "",
        f"batch {split['batch']}, real images; {split['candidates_above_threshold']:.0f} candidate "
        "(anchor, class) scores per image above the score threshold",
        "",
        "| part | median ms |",
        "|---|---|",
    ]
    for name, ms in split["network_ms"].items():
        lines.append(f"| network alone, {name} fp32 (plain export) | {ms:.2f} |")
    lines += [
        f"| SSDDecodeNMS called directly (torch.ops.ssdopt.decode_nms) | {split['op_direct_ms']:.2f} |",
        f"| torchvision SSD.postprocess_detections (Python) | {split['torchvision_post_ms']:.2f} |",
        f"| reference decode (ssdopt.ops.reference, torch) | {split['reference_decode_ms']:.2f} |",
    ]
    for row in rows:
        if row.get("post_in_runtime_ms") is not None:
            low, high = row["post_in_runtime_range_ms"]
            lines.append(
                f"| {row['backend']} {row['precision']} fused engine end to end minus its network, "
                f"(SSDDecodeNMS inside the runtime; {len(row['split_rounds'])} interleaved rounds, "
                f"range {low:.2f}–{high:.2f}) | {row['post_in_runtime_ms']:.2f} |"
            )
        elif row.get("network_p50_ms") is not None and row.get("p50_ms"):
            lines.append(
                f"| {row['backend']}: network {row['network_p50_ms']:.2f}, post-processing "
                f"{row['p50_ms'] - row['network_p50_ms']:.2f} (end to end minus network) | "
                f"{row['p50_ms']:.2f} |"
            )
    return [*lines, ""]


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with latency and mAP that no other row beats on both (lower p50, higher mAP), by p50."""
    points = [r for r in rows if r.get("p50_ms") is not None and r.get("map") is not None]
    front = []
    for row in sorted(points, key=lambda r: (r["p50_ms"], -r["map"])):
        if not front or row["map"] > front[-1]["map"]:
            front.append(row)
    return front


def pareto_plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """PNG: p50 latency (log x) vs mAP, one point per measured row, the Pareto front highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [r for r in rows if r.get("p50_ms") is not None and r.get("map") is not None]
    front = pareto_front(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for row in points:
        on_front = row in front
        ax.scatter(
            row["p50_ms"],
            row["map"],
            s=60 if on_front else 30,
            color="tab:red" if on_front else "tab:gray",
            zorder=3,
        )
        flags = {"✅": "", "❔": " (not validated)"}  # words: DejaVu lacks the emoji
        flag = flags.get(row.get("status"), " (failed validation)")
        ax.annotate(
            f"{row['backend']} {row['precision']}{flag}",
            (row["p50_ms"], row["map"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=7,
        )
    if front:
        ax.step(
            [r["p50_ms"] for r in front],
            [r["map"] for r in front],
            where="post",
            color="tab:red",
            label="Pareto front",
            zorder=2,
        )
        ax.legend(loc="lower right")
    if points:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")
        # plain numbers at 1-1.5-2-3-5-7 steps (the default minor labels "3.2×10¹3.4×10¹" overlap)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 5.0, 7.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("p50 latency, end to end (ms, log scale)")
    ax.set_ylabel("mAP@[.5:.95]")
    ax.set_title("latency vs accuracy")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()

    def save(tmp: Path) -> None:
        fig.savefig(tmp, format="png")

    try:
        return atomic_write(path, save)
    finally:
        plt.close(fig)


def print_table(rows: list[dict[str, Any]], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ssdopt bench")
    for _, title in COLUMNS:
        table.add_column(title)
    for row in rows:
        table.add_row(*(cell(row, key) for key, _ in COLUMNS))
    console = console or Console()
    console.print(table)
    for row in rows:
        if row.get("reason"):
            console.print(f"{row['status']} {row['backend']} {row['precision']}: {row['reason']}")


def write_bench_outputs(
    rows: list[dict[str, Any]], out_dir: Path, context: dict[str, Any]
) -> dict[str, Path]:
    """bench.json (the rows), bench_context.json, bench.md and pareto.png under `out_dir`."""
    return {
        "json": write_json(rows, out_dir / "bench.json"),
        "context": write_json(context, out_dir / "bench_context.json"),
        "markdown": atomic_write(out_dir / "bench.md", lambda tmp: tmp.write_text(markdown(rows, context))),
        "pareto": pareto_plot(rows, out_dir / "pareto.png"),
    }
