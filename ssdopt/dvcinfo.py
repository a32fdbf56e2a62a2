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
