"""ssdopt detect (PNG + JSON per image, boxes in original pixels) and the self-contained HTML report."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssdopt.errors import SsdoptError
from ssdopt.evaluate.detect import detect_images
from ssdopt.evaluate.report import write_report

CHROMIUM = Path("/usr/bin/chromium")


def test_detect_writes_png_and_json_in_original_pixels(bench_run, tmp_path) -> None:
    source = sorted((bench_run["dataset"].parent / "val").glob("*.jpg"))[0]
    big = tmp_path / "big.png"
    Image.open(source).resize((128, 96)).save(big)  # not the engine's 64x64: boxes must scale back
    (png, record), (png_small, _) = detect_images(bench_run["engine"], [big, source], tmp_path / "out", 0.3)
    assert Image.open(png).size == (128, 96) and Image.open(png_small).size == (64, 64)
    data = json.loads(record.read_text())
    names = json.loads((bench_run["engine"] / "export.json").read_text())["class_names"]
    assert data["detections"], "the tiny model is confident: expected detections"
    boxes = np.array([d["box_xyxy"] for d in data["detections"]])
    assert boxes[:, 2].max() > 64 or boxes[:, 3].max() > 64  # scaled beyond the 64-pixel input
    assert (boxes[:, 2] <= 128.01).all() and (boxes[:, 3] <= 96.01).all()
    assert all(d["score"] >= 0.3 and d["class_name"] == names[d["label"]] for d in data["detections"])
    assert not np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(big).convert("RGB")))


def test_detect_refuses_registry_uri_without_resolver_and_bad_image(bench_run, tmp_path) -> None:
    from ssdopt import tracking

    if not hasattr(tracking, "resolve_engine_uri"):
        with pytest.raises(SsdoptError, match="engine directory"):
            detect_images("models:/ssd@champion", [tmp_path / "x.png"], tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(SsdoptError, match="bad.png"):
        detect_images(bench_run["engine"], [bad], tmp_path / "out")


def test_report_html_is_self_contained(bench_run) -> None:
    page = write_report(bench_run["out"]).read_text()
    assert '<table class="bench">' in page and page.count("<tr>") >= 8
    assert "SSDDecodeNMS:</b> node" in page  # the fused engine's node position
    assert "reference implementation in Python" in page  # the head-only engine
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert images and base64.b64decode(images[0])[:4] == b"\x89PNG"
    assert 'src="http' not in page and 'href="http' not in page


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium absent (.ci/install-chromium.sh installs it)"
)
def test_report_renders_in_headless_chromium(bench_run, tmp_path) -> None:
    page = write_report(bench_run["out"])
    shot = tmp_path / "shot.png"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2000",
    ]
    dom = subprocess.run(
        [str(CHROMIUM), *flags, "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert '<table class="bench">' in dom and "torch-eager" in dom and "data:image/png;base64" in dom
    subprocess.run(
        [str(CHROMIUM), *flags, f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=60,
        check=True,
    )
    image = np.asarray(Image.open(shot).convert("L"))
    assert image.std() > 5  # not a blank page
    shutil.copyfile(shot, bench_run["out"] / "report_screenshot.png")


def test_detect_takes_a_folder_and_batches_without_changing_results(bench_run, tmp_path) -> None:
    folder = bench_run["dataset"].parent / "val"
    one = detect_images(bench_run["engine"], [folder], tmp_path / "b1", 0.3, batch_size=1)
    three = detect_images(bench_run["engine"], [folder], tmp_path / "b3", 0.3, batch_size=3)
    assert len(one) == len(three) == len(list(folder.glob("*.jpg"))) == 8
    for (_, a), (_, b) in zip(one, three, strict=True):
        da, db = json.loads(a.read_text())["detections"], json.loads(b.read_text())["detections"]
        assert [d["label"] for d in da] == [d["label"] for d in db]
        np.testing.assert_allclose([d["box_xyxy"] for d in da], [d["box_xyxy"] for d in db], atol=1e-3)
    with pytest.raises(SsdoptError, match="batch-size"):
        detect_images(bench_run["engine"], [folder], tmp_path / "b0", 0.3, batch_size=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SsdoptError, match="holding images"):
        detect_images(bench_run["engine"], [empty], tmp_path / "none", 0.3)


def test_registry_uri_from_another_directory_creates_no_store(tmp_path, monkeypatch) -> None:
    from ssdopt.tracking import resolve_engine_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SsdoptError, match="MLflow store with the registered engines"):
        resolve_engine_uri("models:/ssdlite-shapes.cpu-avx2@champion")
    assert list(tmp_path.iterdir()) == [], "resolving created files in the working directory"
