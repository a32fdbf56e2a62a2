"""INT8 for OpenVINO the way OpenVINO runs it fastest: NNCF post-training quantization of the OpenVINO
model (FakeQuantize nodes OpenVINO's CPU plugin fuses into u8/i8 convolutions), not ORT-made Q/DQ.

- The float ONNX is converted with `openvino.convert_model` (its MOC transformations fold the dynamic
  batch's ShapeOf/Broadcast subgraphs). `core.read_model` leaves those in, and NNCF then finds no
  constant weights for the 31 depthwise convolutions of ssdlite320: they stay f32 (measured here,
  2-core Xeon with AMX: 12.9 vs 3.9 ms end to end).
- SSDDecodeNMS stays in the model and in float: NNCF's ignored_scope lists its type (NNCF's
  statistics runs compile the model with the extension's op, whose evaluate() runs our CPU kernel).
- Calibration: the same DVC calibration set as every int8 engine, all of its images (or
  build.calibration.num_images), preset PERFORMANCE (symmetric activations and weights), NNCF's
  default range estimators and fast bias correction. build.calibration.method applies to the
  ORT-made Q/DQ only.
- Accuracy budget (build.accuracy): quantize, evaluate, and while mAP drops more than the budget
  keep the most damaging quantized layers in float through ignored_scope names: the loop of
  `quantize_with_budget` (ssdopt.quantize.budget), ranked by SNR lost per layer (`ov_layer_sensitivity`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.errors import SsdoptError
from ssdopt.quantize.budget import budget_rounds, checked_map
from ssdopt.quantize.calibration_reader import (
    CalibrationSpec,
    ImageBatches,
    calibration_reader,
    calibration_version,
)

NMS_TYPE = "SSDDecodeNMS"
QUANTIZABLE = ("Convolution", "GroupConvolution", "MatMul", "ConvolutionBackpropData")
SNR_CAP_DB = 120.0


def convert(onnx_path: Path, library: Path | None) -> Any:
    """openvino.convert_model of the ONNX (with the SSDDecodeNMS extension where the graph has the node)."""
    import openvino as ov

    try:
        if library is None:
            return ov.convert_model(str(onnx_path))
        return ov.convert_model(str(onnx_path), extension=str(library))
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the frontend's message
        raise SsdoptError(
            onnx_path, f"a graph OpenVINO's ONNX frontend can read ({exc})", "re-export the model"
        ) from exc


class _Images:
    """A re-iterable of float32 [B, 3, H, W] calibration batches (NNCF iterates it more than once)."""

    def __init__(self, reader: ImageBatches, images: int) -> None:
        self.reader = reader
        self.count = -(-images // reader.batch_size)  # batches

    def __iter__(self) -> Iterator[np.ndarray]:
        self.reader.rewind()
        while (batch := self.reader.get_next()) is not None:
            yield batch[self.reader.input_name]
        self.reader.rewind()

    def __len__(self) -> int:
        return self.count


def quantized_ops(model: Any) -> list[str]:
    """Friendly names of convolutions/matmuls that read a FakeQuantize output (they run in int8)."""
    names = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in QUANTIZABLE:
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() == "FakeQuantize":
            names.append(op.get_friendly_name())
    return names


def _nncf_quantize(model: Any, images: _Images, ignored: list[str], has_nms: bool) -> Any:
    import nncf

    scope = nncf.IgnoredScope(names=list(ignored), types=[NMS_TYPE] if has_nms else [], validate=False)
    return nncf.quantize(
        model.clone(),
        nncf.Dataset(images),
        preset=nncf.QuantizationPreset.PERFORMANCE,
        subset_size=len(images),
        ignored_scope=scope,
    )


def _snr_db(reference: list[np.ndarray], value: list[np.ndarray]) -> float:
    signal = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in reference)
    noise = sum(
        float(np.sum(np.square(r.astype(np.float64) - v))) for r, v in zip(reference, value, strict=True)
    )
    if noise <= 0.0:
        return SNR_CAP_DB
    if signal <= 0.0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * np.log10(signal / noise)))


def _run_with_outputs(
    core: Any, model: Any, ports: list[Any], batches: list[np.ndarray]
) -> list[list[np.ndarray]]:
    """Values of `ports` (outputs of `model`'s ops; `model` gains them as outputs) per batch, f32."""

    def key(port: Any) -> tuple[str, int]:
        return port.get_node().get_friendly_name(), port.get_index()

    model.add_outputs(ports)  # a port asked for twice (or already an output) gets one Result
    index = {key(result.input_value(0)): i for i, result in enumerate(model.get_results())}
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()
    values = []
    for batch in batches:
        request.infer({0: batch})
        values.append([np.array(request.get_output_tensor(index[key(p)]).data) for p in ports])
    return values


def ov_layer_sensitivity(
    core: Any, float_model: Any, int8_model: Any, batches: list[np.ndarray]
) -> list[dict[str, Any]]:
    """Quantized layers of `int8_model`, worst first: SNR lost across the layer (input SNR after its
    FakeQuantize minus output SNR, vs the same op of the float model), as `layer_sensitivity` ranks."""
    float_model, int8_model = float_model.clone(), int8_model.clone()  # they gain outputs below
    float_ops = {op.get_friendly_name(): op for op in float_model.get_ops()}
    int8_ops = {op.get_friendly_name(): op for op in int8_model.get_ops()}
    names = [n for n in quantized_ops(int8_model) if n in float_ops]
    if not names:
        return []
    float_ports = [p for n in names for p in (float_ops[n].input_value(0), float_ops[n].output(0))]
    int8_ports = [p for n in names for p in (int8_ops[n].input_value(0), int8_ops[n].output(0))]
    ref = _run_with_outputs(core, float_model, float_ports, batches)
    got = _run_with_outputs(core, int8_model, int8_ports, batches)
    rows = []
    for i, name in enumerate(names):
        snr_in = _snr_db([r[2 * i] for r in ref], [g[2 * i] for g in got])
        snr_out = _snr_db([r[2 * i + 1] for r in ref], [g[2 * i + 1] for g in got])
        rows.append(
            {
                "node": name,
                "op_type": int8_ops[name].get_type_name(),
                "snr_in_db": round(snr_in, 2),
                "snr_out_db": round(snr_out, 2),
                "loss_db": round(snr_in - snr_out, 2),
            }
        )
    rows.sort(key=lambda r: (-r["loss_db"], r["snr_out_db"]))
    return rows


def quantize_openvino(
    onnx_path: Path,
    out_xml: Path,
    *,
    core: Any,
    library: Path | None,
    calibration: CalibrationSpec,
    image: dict[str, Any],
    exclude: tuple[str, ...] | list[str] = (),
    evaluate: Callable[[Path], float] | None = None,
    budget_points: float = 1.0,
    max_rounds: int = 4,
    layers_per_round: int = 2,
    sensitivity_batches: int = 4,
) -> dict[str, Any]:
    """NNCF int8 of the float ONNX `onnx_path` saved as OpenVINO IR `out_xml`; the record of what was done.

    `core`: an ov.Core with the SSDDecodeNMS extension (where the graph has the node). `image`: the
    graph's input spec (name, static [B, 3, H, W]). `exclude`: OpenVINO op names kept in float.
    `evaluate(path) -> mAP in [0, 1]`: called on the float ONNX, then on each round's IR (.xml, the
    decode node included); with it the accuracy loop runs (see module docstring).
    """
    import nncf
    import openvino as ov

    height = image["shape"][2]
    if not isinstance(height, int):
        raise SsdoptError(
            onnx_path, "a static image height/width to calibrate with", "export with a fixed size"
        )
    reader = calibration_reader(
        calibration.directory, height, image["name"], calibration.num_images, calibration.batch_size
    )
    used = calibration_version(calibration.directory, calibration.num_images)["images_used"]
    images = _Images(reader, used)
    model = convert(onnx_path, library)
    has_nms = any(op.get_type_name() == NMS_TYPE for op in model.get_ops())
    op_names = {op.get_friendly_name() for op in model.get_ops()}
    unknown = sorted(set(exclude) - op_names)
    if unknown:
        raise SsdoptError(
            f"int8 exclude nodes {unknown[:5]}",
            f"OpenVINO op names of {Path(onnx_path).name} (the NNCF int8 route)",
            "take names from layers.json (originalLayersNames), or set build.int8_quantizer: onnxruntime",
        )
    excluded = list(exclude)
    fallback: dict[str, Any] | None = None
    if evaluate is None:
        quantized = _nncf_quantize(model, images, excluded, has_nms)
    else:
        reference = checked_map(evaluate(Path(onnx_path)), str(onnx_path))
        batches = reader.arrays(sensitivity_batches)
        with tempfile.TemporaryDirectory(dir=Path(out_xml).parent, prefix=".nncf-budget-") as tmp:

            def build(round_index: int, nodes: list[str]) -> tuple[Any, float]:
                """This round's NNCF model with `nodes` float, and the mAP of its saved IR."""
                quantized = _nncf_quantize(model, images, nodes, has_nms)
                candidate = Path(tmp) / f"int8_round{round_index}.xml"
                ov.save_model(quantized, str(candidate), compress_to_fp16=False)
                return quantized, checked_map(evaluate(candidate), str(candidate))

            outcome = budget_rounds(
                build,
                lambda quantized: ov_layer_sensitivity(core, model, quantized, batches),
                reference=reference,
                exclude=excluded,
                budget_points=budget_points,
                max_rounds=max_rounds,
                layers_per_round=layers_per_round,
            )
        quantized, excluded = outcome.candidate, outcome.excluded
        fallback = {
            "within_budget": outcome.within_budget,
            "budget_points": budget_points,
            "fp32_map": reference,
            "int8_map": outcome.map,
            "drop_points": round(100.0 * (reference - outcome.map), 4),
            "fallback_layers": excluded,
            "rounds": outcome.rounds,
        }
    # compress_to_fp16 defaults to True: it would turn the float weights left (excluded layers) into fp16.
    ov.save_model(quantized, str(out_xml), compress_to_fp16=False)
    record: dict[str, Any] = {
        "target": "openvino",
        "tool": f"nncf.quantize {nncf.__version__} (OpenVINO model, openvino {ov.__version__})",
        "format": "FakeQuantize (OpenVINO IR)",
        "preset": "PERFORMANCE",
        "activation_type": "int8 symmetric (NNCF PERFORMANCE preset; u8 after ReLU)",
        "weight_type": "int8 symmetric per-channel",
        "calibration": {
            "images": used,
            "method": "NNCF defaults (min/max statistics, fast bias correction)",
            "note": "build.calibration.method applies to the ORT-made Q/DQ (int8_quantizer: onnxruntime)",
        },
        "excluded_auto": [NMS_TYPE] if has_nms else [],
        "excluded_fallback": sorted(set(excluded)),
        "overflow_fix": "NNCF default (first_layer_only: half-range weights in the first convolution)",
        "quantized_nodes": quantized_ops(quantized),
    }
    if fallback is not None:
        record["fallback"] = fallback
    return record
