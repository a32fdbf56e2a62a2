"""ssdopt.fileio: hashes and atomic writes; published outputs are readable like plain files."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from ssdopt import fileio
from ssdopt.data import atomic_output_dir
from ssdopt.fileio import atomic_write, sha256_file, write_json


def test_sha256_file_matches_hashlib_on_random_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * (1 << 20) + 17)  # crosses the 1 MiB read blocks
    path = tmp_path / "blob"
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


def test_atomic_write_publishes_with_the_umask_mode_not_mkstemp_0600(tmp_path: Path) -> None:
    path = write_json({"a": 1}, tmp_path / "out.json")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~fileio._UMASK
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "out.txt"
    path.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, boom)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_output_dir_publishes_a_readable_directory(tmp_path: Path) -> None:
    out = tmp_path / "engine"
    with atomic_output_dir(out, "metadata.json") as tmp:
        (tmp / "metadata.json").write_text("{}")
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~fileio._UMASK
