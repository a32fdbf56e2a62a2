"""Datasets: the synthetic generator, COCO I/O, the calibration set and the shared image reader.

Also the one helper every dataset writer uses to publish a directory atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ssdopt.errors import SsdoptError
from ssdopt.fileio import created_dirs, publish_mode


@contextmanager
def atomic_output_dir(out: Path, marker: str) -> Iterator[Path]:
    """Yield a fresh temp dir beside `out`; on success it replaces `out`, on failure it is removed.

    An existing `out` is replaced only if it is empty or holds `marker` (a file this writer
    creates), so a mistyped path never deletes unrelated data.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SsdoptError(out, "a directory path (or nothing) for the output", "choose another --out")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise SsdoptError(
            out,
            f"an empty directory or an earlier output of this command (with {marker})",
            "choose an empty or new --out directory; nothing was overwritten",
        )
    with created_dirs(out.parent):
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.tmp-"))
        try:
            yield tmp
            publish_mode(tmp)
            if out.exists():
                old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f"{out.name}.old-"))
                out.rename(old / out.name)
                tmp.rename(out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
