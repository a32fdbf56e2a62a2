"""Read DVC's record of a stage output: its md5 is the version every later step records."""

from __future__ import annotations

from pathlib import Path

import yaml


def output_md5(out: str | Path, lock: Path = Path("dvc.lock")) -> str | None:
    """md5 that `dvc repro` recorded for output `out` (a path relative to the repo), or None.

    Directory outputs carry DVC's ``<md5>.dir`` form; it is returned as DVC writes it.
    """
    if not lock.exists():
        return None
    data = yaml.safe_load(lock.read_text()) or {}
    wanted = Path(out).as_posix().rstrip("/")
    for stage in (data.get("stages") or {}).values():
        for item in stage.get("outs") or []:
            if Path(item.get("path", "")).as_posix().rstrip("/") == wanted:
                return item.get("md5")
    return None


def tracked_md5(path: str | Path) -> str | None:
    """md5 of `path` as DVC versions it: a stage output in dvc.lock, or a `dvc add`-ed folder/file
    (its `<path>.dvc` file, found beside `path` or beside any folder above it). None if DVC does not
    track it."""
    path = Path(path)
    found = output_md5(path)
    if found:
        return found
    for candidate in (path, *path.resolve().parents):
        record = candidate.with_name(candidate.name + ".dvc") if candidate.name else None
        if record is not None and record.is_file():
            outs = (yaml.safe_load(record.read_text()) or {}).get("outs") or []
            return outs[0].get("md5") if outs else None
    return None
