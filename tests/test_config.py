"""params.yaml loading, DVC lock reading and the CLI's error boundary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ssdopt.config import load_params, section
from ssdopt.dvcinfo import output_md5
from ssdopt.errors import SsdoptError

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_have_the_pipeline_sections() -> None:
    params = load_params(REPO / "params.yaml")
    for name in ("model", "generate", "calibration", "export"):
        assert name in params, name
    assert params["generate"]["train"] >= 6000
    assert params["calibration"]["strategy"] in {"random", "class-balanced"}


def test_missing_params_file_gives_empty_sections(tmp_path: Path) -> None:
    assert load_params(tmp_path / "nope.yaml") == {}
    assert section("generate", tmp_path / "nope.yaml") == {}


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("generate: [unclosed\n")
    with pytest.raises(SsdoptError) as info:
        load_params(bad)
    assert str(bad) in str(info.value) and "valid YAML" in str(info.value)


def test_non_mapping_params_rejected(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(SsdoptError, match="mapping"):
        load_params(bad)


def test_output_md5_reads_dvc_lock(tmp_path: Path) -> None:
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        "schema: '2.0'\nstages:\n  calibration:\n    cmd: x\n    outs:\n"
        "    - path: data/calibration\n      hash: md5\n      md5: abc123.dir\n"
    )
    assert output_md5("data/calibration", lock) == "abc123.dir"
    assert output_md5("data/calibration/", lock) == "abc123.dir"
    assert output_md5("data/other", lock) is None
    assert output_md5("data/calibration", tmp_path / "missing.lock") is None


def test_cli_turns_project_errors_into_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("generate: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "ssdopt.cli", "data", "generate", "--train", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "params.yaml" in proc.stderr and "Fix:" in proc.stderr
    assert not (tmp_path / "data").exists()


def test_cli_usage_error_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ssdopt.cli", "data", "generate", "--bogus"], capture_output=True, text=True
    )
    assert proc.returncode == 2
