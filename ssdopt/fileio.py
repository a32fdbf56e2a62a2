"""File helpers every stage shares: content hashes, and atomic writes so no reader sees half a file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (engines and checkpoints can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """One sha256 over several files (name + bytes each, in the given order): e.g. OpenVINO .xml + .bin."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(Path(path).name.encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def _read_umask() -> int:
    mask = os.umask(0o022)  # the umask can only be read by setting it
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask is process-wide, so not read while threads run


def publish_mode(path: Path) -> None:
    """Give a finished temp file or directory the mode a plain open()/mkdir() would have.

    mkstemp/mkdtemp create 0600/0700 (private while half written); left so, a published engine or
    dataset could not be read by another user or container uid.
    """
    path.chmod((0o777 if path.is_dir() else 0o666) & ~_UMASK)


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` into a temp file beside `path`, then rename it over `path`; returns `path`.

    On any failure the temp file is removed and `path` keeps its old content (or stays absent).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        publish_mode(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(data: Any, path: Path, *, sort_keys: bool = True, indent: int | None = 1) -> Path:
    """Write `data` as JSON atomically (UTF-8, non-JSON values via str); returns `path`."""
    text = json.dumps(data, indent=indent, sort_keys=sort_keys, ensure_ascii=False, default=str) + "\n"
    return atomic_write(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextmanager
def created_dirs(path: Path) -> Iterator[Path]:
    """`mkdir -p path` for a writer; if the writer fails, the directories made here are removed again
    (deepest first, only while empty), so a refused input leaves no empty output folders behind."""
    path = Path(path)
    made: list[Path] = []
    probe = path
    while not probe.exists() and probe != probe.parent:
        made.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    except BaseException:
        for directory in made:
            try:
                directory.rmdir()
            except OSError:
                break
        raise
