"""The engine directory every backend writes the same way, and the checks before loading one.

Layout: engine file(s), metadata.json, layers.json, source_graph.json (topology of the graph the
runtime consumed, for fusion tracing), fusion.json + fusion.md, and anchors.npy/export.json copied
from the export when present. Written atomically: a failed build leaves nothing.
"""

from __future__ import annotations

import datetime as _dt
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ssdopt.backends.base import BuildSpec, Engine, LayerInfo
from ssdopt.backends.device import describe, same_device
from ssdopt.backends.graph import has_custom_nms, input_spec, load_topology, output_specs, topology
from ssdopt.data import atomic_output_dir
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file, sha256_files, write_json

SCHEMA = "ssdopt-engine-1"
METADATA = "metadata.json"
EXPORT_SIDECARS = ("anchors.npy", "export.json")
PLUGIN_DIR = "plugins"


@dataclass
class CompileRecord:
    """What a backend's compile step reports: engine files written, runtime and device records."""

    files: list[str]
    runtime: dict[str, Any]
    device: dict[str, Any]
    hardware_specific: bool = True
    settings: dict[str, Any] = field(default_factory=dict)  # e.g. inference precision hint, providers
    plugin: dict[str, Any] | None = None  # the native SSDDecodeNMS library the engine needs
    quantization: dict[str, Any] | None = None  # int8 made by the backend itself (OpenVINO NNCF)


def plugin_record(model: onnx.ModelProto, spec: BuildSpec) -> dict[str, Any] | None:
    """spec.plugin_library (path + sha256) for a graph with SSDDecodeNMS, or None without the node.

    Backends that find their binding themselves (ORT, OpenVINO) report it in CompileRecord.plugin.
    """
    if not has_custom_nms(model):
        return None
    path = spec.plugin_library
    if path is None or not Path(path).is_file():
        return {"path": str(path) if path else None, "sha256": None}
    return {"path": str(path), "sha256": sha256_file(path)}


def bundle_plugin(tmp: Path, library: Path, **details: Any) -> dict[str, Any]:
    """Copy `library` to <engine>/plugins/<name>; its metadata record: relative file, name, sha256, bytes.

    The sha256 is of the copy, compared with the source so a library changing under the copy fails here.
    """
    library = Path(library)
    expected = sha256_file(library)
    target = tmp / PLUGIN_DIR / library.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(library, target)
    copied = sha256_file(target)
    if copied != expected:
        raise SsdoptError(
            library,
            f"the same bytes while it was copied (sha256 {expected[:16]}..., copy {copied[:16]}...)",
            "let the plugin build finish, then rebuild the engine",
        )
    return {
        "file": f"{PLUGIN_DIR}/{library.name}",
        "name": library.name,
        "sha256": copied,
        "bytes": target.stat().st_size,
        **details,
    }


def engine_plugin(
    engine_dir: Path, metadata: dict[str, Any], name: str, candidates: tuple[Path, ...] = ()
) -> Path | None:
    """The SSDDecodeNMS library recorded in `metadata`, found by content and verified; None if none recorded.

    Looked for, in order: the copy beside the engine (plugin.file, relative to the engine; a copy whose
    bytes differ is refused, not skipped), `candidates` (e.g. an override variable) and, for engines
    recorded before the copy existed, their absolute plugin.path, each used only if its sha256 matches;
    then the build cache (ssdopt.ops.library.cached_library). Nothing here loads the library.
    """
    from ssdopt.ops.library import build_root, cached_library

    engine_dir = Path(engine_dir)
    recorded = metadata.get("plugin") or {}
    sha256 = recorded.get("sha256")
    if not sha256:
        return None
    name = recorded.get("name") or name
    relative = recorded.get("file")
    backend, precision = metadata.get("backend"), metadata.get("precision")
    rebuild = f"rebuild it: ssdopt build --backend {backend} --precision {precision}"
    if relative is not None:
        bundled = _inside(engine_dir, relative)
        if bundled.is_file():
            actual = sha256_file(bundled)
            if actual != sha256:
                raise SsdoptError(
                    bundled,
                    f"sha256 {sha256} as recorded in {engine_dir / METADATA}, found {actual} "
                    "(the SSDDecodeNMS library beside the engine changed after the build)",
                    f"copy the engine directory again from where it was built, or {rebuild}",
                )
            return bundled
    legacy = [Path(recorded["path"])] if relative is None and recorded.get("path") else []
    for candidate in (*candidates, *legacy):
        if candidate.is_file() and sha256_file(candidate) == sha256:
            return candidate
    cached = cached_library(name, sha256)
    if cached is not None:
        return cached
    places = [f"beside it ({relative})"] if relative is not None else []
    places += [str(p) for p in (*candidates, *legacy)]
    places.append(f"in the plugin build cache {build_root()}")
    moved = (
        "copy the engine directory whole (its plugins/ folder included)"
        if relative is not None
        else "this engine was built before engines carried their plugin and loads only where that "
        "library still is"
    )
    raise SsdoptError(
        engine_dir,
        f"the SSDDecodeNMS library it was built with, {name} with sha256 {sha256[:16]}..., "
        f"{' or '.join(places)}",
        f"{moved}; or {rebuild}",
    )


def _inside(engine_dir: Path, relative: str) -> Path:
    """engine_dir / relative, refusing a recorded path that is absolute or leaves the engine directory."""
    path = Path(relative)
    if path.is_absolute() or ".." in path.parts:
        raise SsdoptError(
            engine_dir / METADATA,
            f"plugin.file relative to the engine directory, got {relative!r}",
            "rebuild the engine with `ssdopt build`",
        )
    return engine_dir / path


def check_plugin(engine_dir: Path, metadata: dict[str, Any], current: dict[str, Any] | None) -> None:
    """Refuse an engine whose SSDDecodeNMS library changed since the build (its results would too)."""
    recorded = metadata.get("plugin") or {}
    if current is None or not recorded.get("sha256"):
        return
    if current["sha256"] != recorded["sha256"]:
        raise SsdoptError(
            engine_dir,
            f"the SSDDecodeNMS library it was built with (sha256 {recorded['sha256'][:16]}...), "
            f"found {current['path']} with sha256 {current['sha256'][:16]}...",
            "rebuild the engine with `ssdopt build` (the native plugin changed)",
        )


def build_engine_dir(
    backend: Any,
    onnx_path: Path,
    spec: BuildSpec,
    out: Path,
    provenance: dict[str, Any] | None,
    compile_fn: Callable[[Path, onnx.ModelProto, BuildSpec, Path], CompileRecord],
) -> Engine:
    """Run `compile_fn` into a temp dir beside `out`, add metadata/layers/fusion, rename to `out`."""
    onnx_path, out = Path(onnx_path), Path(out)
    provenance = dict(provenance or {})
    model = load_topology(onnx_path)
    with atomic_output_dir(out, METADATA) as tmp:
        start = time.perf_counter()
        record = compile_fn(onnx_path, model, spec, tmp)
        build_time = time.perf_counter() - start
        engine_files = [tmp / name for name in record.files]
        source_dir = Path(provenance.get("source_dir", onnx_path.parent))
        for name in EXPORT_SIDECARS:
            if (source_dir / name).is_file():
                shutil.copyfile(source_dir / name, tmp / name)
        write_json(topology(model), tmp / "source_graph.json")
        if provenance.get("graph_is_derived"):  # the fp16 / Q/DQ graph this engine was built from
            shutil.copyfile(onnx_path, tmp / "graph.onnx")
        metadata = {
            "schema": SCHEMA,
            "backend": backend.name,
            "runtime": record.runtime,
            "device": record.device,
            "hardware_specific": record.hardware_specific,
            "precision": spec.precision,
            "settings": record.settings,
            "input": input_spec(model),
            "outputs": output_specs(model),
            "has_decode_nms": has_custom_nms(model),
            "graph": {
                "file": "graph.onnx" if provenance.get("graph_is_derived") else None,
                "sha256": sha256_file(onnx_path),
            },
            "source_onnx": provenance.get("source_onnx")
            or {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
            "calibration": provenance.get("calibration"),
            "quantization": record.quantization or provenance.get("quantization"),
            "fp16": provenance.get("fp16"),
            "plugin": record.plugin if record.plugin is not None else plugin_record(model, spec),
            "spec": spec.key_fields(),
            "build_key": provenance.get("build_key"),
            "build_time_s": round(build_time + float(provenance.get("prepare_time_s", 0.0)), 3),
            "compile_time_s": round(build_time, 3),
            "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "engine": {
                "file": record.files[0],
                "files": record.files,
                "sha256": sha256_files(engine_files)
                if len(engine_files) > 1
                else sha256_file(engine_files[0]),
            },
        }
        write_json(metadata, tmp / METADATA)
        layers = backend.layers(tmp)
        write_json([layer.to_dict() for layer in layers], tmp / "layers.json")
        _write_fusion(
            tmp, provenance.get("unfolded_onnx") or _sibling_unfolded(onnx_path, source_dir), model, layers
        )
    return Engine.open(out)


def _sibling_unfolded(onnx_path: Path, source_dir: Path) -> Path | None:
    candidate = source_dir / "model_unfolded.onnx"
    return candidate if candidate.is_file() else None


def _write_fusion(
    tmp: Path, unfolded: Path | str | None, source: onnx.ModelProto, layers: list[LayerInfo]
) -> None:
    from ssdopt.fusion import fusion_report, fusion_table

    reference = load_topology(unfolded) if unfolded else source
    report = fusion_report(reference, source, layers, reference_path=str(unfolded) if unfolded else None)
    write_json(report, tmp / "fusion.json")
    (tmp / "fusion.md").write_text(fusion_table(report))


def engine_files(engine_dir: Path, metadata: dict[str, Any]) -> list[Path]:
    return [engine_dir / name for name in metadata["engine"].get("files", [metadata["engine"]["file"]])]


def check_engine(
    engine_dir: Path | str,
    backend: str,
    runtime_version: str,
    device: dict[str, Any],
    *,
    version_matches: Callable[[str, str], bool] | None = None,
    device_matches: Callable[[dict[str, Any], dict[str, Any]], bool] | None = None,
) -> dict[str, Any]:
    """metadata.json of `engine_dir` after refusing a tampered, foreign or mismatched engine.

    Checks, in order: backend, engine file sha256, runtime version, device. Returns the metadata.
    """
    engine_dir = Path(engine_dir)
    engine = Engine.open(engine_dir)
    meta = engine.metadata
    rebuild = f"rebuild it here: ssdopt build --backend {backend} --precision {meta.get('precision', 'fp32')}"
    if meta.get("schema") != SCHEMA or meta.get("backend") != backend:
        raise SsdoptError(
            engine_dir / METADATA,
            f"a {SCHEMA} engine of backend '{backend}', "
            f"got schema {meta.get('schema')!r} of backend {meta.get('backend')!r}",
            rebuild,
        )
    files = engine_files(engine_dir, meta)
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise SsdoptError(engine_dir, f"engine files {missing}", rebuild)
    digest = sha256_files(files) if len(files) > 1 else sha256_file(files[0])
    if digest != meta["engine"]["sha256"]:
        raise SsdoptError(
            files[0],
            f"sha256 {meta['engine']['sha256'][:16]}... as recorded at build, got {digest[:16]}...",
            f"the engine file changed after it was built; {rebuild}",
        )
    recorded_version = str(meta.get("runtime", {}).get("version"))
    ok_version = (version_matches or (lambda a, b: a == b))(recorded_version, runtime_version)
    if not ok_version:
        raise SsdoptError(
            engine_dir,
            f"runtime {backend} {recorded_version} as at build (this process has {runtime_version})",
            f"install {backend}=={recorded_version} or {rebuild}",
        )
    recorded_device = meta.get("device", {})
    if not (device_matches or same_device)(recorded_device, device):
        raise SsdoptError(
            engine_dir,
            f"the device it was built for, {describe(recorded_device)} (this machine: {describe(device)})",
            f"engines are hardware specific; {rebuild}",
        )
    return meta
