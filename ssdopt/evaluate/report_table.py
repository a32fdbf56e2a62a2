"""One row format for every engine table (flow artifact, CLI, Markdown): status legend included.

✅ built and validated · ❎ built but failed validation · ❌ failed to build (with the reason) ·
❔ built, not validated (no fp32 reference to compare with).
"""

from __future__ import annotations

from typing import Any

STATUS = {"validated": "✅", "invalid": "❎", "failed": "❌", "built": "❔"}
COLUMNS = (
    ("backend", "backend", "{}"),
    ("precision", "precision", "{}"),
    ("status", "status", "{}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("build_s", "build s", "{:.1f}"),
    ("map", "mAP", "{:.4f}"),
    ("delta_map", "ΔmAP pts", "{:+.2f}"),
    ("agreement", "agree", "{:.2f}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("throughput_ips", "img/s", "{:.0f}"),
    ("speedup", "speed-up", "{:.2f}x"),
)


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if key == "status":
        mark = STATUS.get(str(value), "?")
        return f"{mark} {row['reason']}" if row.get("reason") else mark
    if value is None and key == "agreement" and row.get("delta_map") is not None:
        return "n/a"  # validated, but the reference had no confident detection to agree with
    if value is None:
        return "–"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def format_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Rows as display strings keyed by column title."""
    return [{title: _cell(row, key, fmt) for key, title, fmt in COLUMNS} for row in rows]


def markdown_table(rows: list[dict[str, Any]]) -> str:
    titles = [title for _, title, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    for shown in format_rows(rows):
        lines.append("| " + " | ".join(shown[t].replace("|", "/") for t in titles) + " |")
    return "\n".join(lines)


STATUS_WORDS = {
    "validated": "built and validated",
    "invalid": "built but failed validation",
    "failed": "failed to build",
    "built": "built, not validated (no fp32 reference)",
}


def bench_rows(rows: list[dict[str, Any]], graph: str) -> list[dict[str, Any]]:
    """Rows of this table in the form of `ssdopt bench`'s (bench.json), so one report renders both."""
    return [
        {
            **{key: row.get(key) for key, _, _ in COLUMNS},
            "graph": graph,
            "device": row.get("device"),
            "batch": row.get("batch"),
            "status": STATUS.get(str(row.get("status")), "?"),
            "status_name": STATUS_WORDS.get(str(row.get("status")), str(row.get("status"))),
            "reason": row.get("reason", ""),
            "engine": row.get("engine"),
        }
        for row in rows
    ]
