"""Reading an AOTInductor package: its kernels and extern calls (layers), the Conv->BN->activation
fusion they show, and a crash-safe load probe in a child process.

Everything here comes from the compiled artifact itself: the generated wrapper C++ inside the .pt2
(kernel launches, ATen extern calls, the proxy-executor table of custom ops, Inductor's "Source
Nodes" comments), never from assumptions about what Inductor does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from ssdopt.backends.base import LayerInfo
from ssdopt.errors import SsdoptError

# Activations Inductor may fuse into a convolution; ONNX-style names for the fusion report.
ACTIVATION_OPS = {
    "relu": "Relu",
    "relu_": "Relu",
    "hardtanh": "Clip",
    "hardtanh_": "Clip",
    "hardswish": "HardSwish",
    "hardswish_": "HardSwish",
    "hardsigmoid": "HardSigmoid",
    "hardsigmoid_": "HardSigmoid",
    "silu": "Sigmoid",
    "silu_": "Sigmoid",
    "sigmoid": "Sigmoid",
    "leaky_relu": "LeakyRelu",
    "gelu": "Gelu",
}


# ----------------------------------------------------------------------------------------------
# layers(): the kernels and extern calls of the compiled artifact, read from its generated wrapper

_CALL = re.compile(
    r"^\s*(?:AOTI_TORCH_ERROR_CODE_CHECK\()?"
    r"(?:(?P<cpp>cpp_fused_\w+)|(?:call_|kernels_?\.|launchKernel\(\s*kernels_?\.)?(?P<triton>triton_\w+)|"
    r"aoti_torch_(?P<device>cpu|cuda)_(?P<extern>\w+)|"
    r"aoti_torch_proxy_executor_call_function\(\s*\w+\s*,\s*(?P<proxy>\d+)|"
    r"aoti_torch_call_dispatcher\(\s*\"(?P<dispatch>[^\"]+)\")\s*\(?"
)
_SOURCE = re.compile(
    r"//\s*Topologically Sorted Source Nodes:\s*\[(?P<nodes>[^\]]*)\],"
    r"\s*Original ATen:\s*\[(?P<aten>[^\]]*)\]"
)
_STRING_ARG = re.compile(r'"([a-z_]+)"')


def package_sources(package: Path) -> dict[str, Any]:
    """The generated wrapper C++ (run_impl body), its proxy-call table and the build metadata from a .pt2."""
    try:
        archive = zipfile.ZipFile(package)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SsdoptError(
            package, f"an AOTInductor .pt2 package (zip) ({exc})", "rebuild the engine"
        ) from exc
    with archive:
        names = archive.namelist()
        wrappers = [n for n in names if n.endswith(".wrapper.cpp") and "/aotinductor/" in n]
        if not wrappers:
            raise SsdoptError(
                package,
                "generated wrapper source (*.wrapper.cpp) inside the package",
                "rebuild with the default AOTInductor packaging (sources are packaged with the .so)",
            )
        stem = wrappers[0][: -len(".cpp")]
        code = archive.read(wrappers[0]).decode(errors="replace")
        proxy = json.loads(archive.read(f"{stem}.json")) if f"{stem}.json" in names else {"nodes": []}
        meta_name = f"{stem}_metadata.json"
        meta = json.loads(archive.read(meta_name)) if meta_name in names else {}
        kernels = "\n".join(
            archive.read(n).decode(errors="replace") for n in names if n.endswith(".kernel.cpp")
        )
    start = code.find("AOTInductorModel::run_impl(")
    end = code.find("// AOTInductorModel::run_impl", start + 1)
    body = code[start:end] if 0 <= start < end else code[max(start, 0) :]
    return {
        "wrapper": wrappers[0],
        "run_impl": body,
        "proxy_nodes": proxy.get("nodes", []),
        "metadata": meta,
        "kernel_source": kernels + code,
    }


def _cpp_kernel_precision(source: str, kernel: str) -> str | None:
    """Pointer element types in the kernel's signature: "fp32", "bf16", "fp16" or a mix ("bf16+fp32")."""
    match = re.search(rf'extern "C"\s+void\s+{re.escape(kernel)}\(([^)]*)\)', source)
    if not match:
        return None
    kinds = {
        "float": "fp32",
        "half": "fp16",
        "at::Half": "fp16",
        "bfloat16": "bf16",
        "at::BFloat16": "bf16",
        "c10::Half": "fp16",
        "c10::BFloat16": "bf16",
    }
    found = {
        kinds[t]
        for t in re.findall(
            r"(at::BFloat16|c10::BFloat16|at::Half|c10::Half|bfloat16|half|float)\*", match.group(1)
        )
    }
    return "+".join(sorted(found)) or None


def layers_from_package(package: Path, precision: str) -> list[LayerInfo]:
    """One LayerInfo per kernel launch / extern call in the compiled model's run function, in order.

    type: "inductor:cpp" / "inductor:triton" (generated, fused kernels), "aten:<op>" (extern calls
    Inductor kept, e.g. mkldnn._convolution_pointwise with its fused activation), "custom_op:<op>"
    (ssdopt::decode_nms via the proxy executor). fused_from: the exported-graph nodes Inductor names
    in its "Source Nodes" comment for the call.
    """
    sources = package_sources(package)
    proxy_nodes = sources["proxy_nodes"]
    layers: list[LayerInfo] = []
    seen: Counter[str] = Counter()
    pending: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    for line in sources["run_impl"].splitlines():
        comment = _SOURCE.search(line)
        if comment:
            nodes = tuple(n.strip() for n in comment.group("nodes").split(",") if n.strip())
            aten = tuple(a.strip() for a in comment.group("aten").split(",") if a.strip())
            pending = (nodes, aten)
            continue
        match = _CALL.match(line)
        if not match:
            continue
        attributes: dict[str, Any] = {}
        if match.group("cpp"):
            kernel, kind = match.group("cpp"), "inductor:cpp"
            layer_precision = _cpp_kernel_precision(sources["kernel_source"], kernel) or precision
        elif match.group("triton"):
            kernel, kind, layer_precision = match.group("triton"), "inductor:triton", precision
        elif match.group("extern"):
            op = match.group("extern")
            if op in _NOT_KERNELS or op.startswith(("get_", "_reinterpret", "new_", "empty")):
                continue
            kernel, kind, layer_precision = (
                f"{match.group('device')}_{op}",
                f"aten:{_aten_name(op)}",
                precision,
            )
            strings = [s for s in _STRING_ARG.findall(line) if s]
            if "convolution" in op and strings:
                attributes["activation"] = strings[0]
        else:
            if match.group("proxy") is not None:
                index = int(match.group("proxy"))
                target = (
                    proxy_nodes[index]["node"]["target"] if index < len(proxy_nodes) else f"proxy#{index}"
                )
            else:
                target = match.group("dispatch")
            kernel, kind, layer_precision = target, f"custom_op:{target}", "fp32"
            attributes["note"] = "inputs fp32 or fp16; decode, NMS and outputs in fp32"
        seen[kernel] += 1
        name = kernel if seen[kernel] == 1 else f"{kernel}#{seen[kernel]}"
        fused_from: tuple[str, ...] = ()
        if pending is not None:
            fused_from, aten = pending
            attributes["original_aten"] = list(aten)
            pending = None
        layers.append(
            LayerInfo(name, kind, layer_precision, fused_from, {**attributes, "call_index": len(layers)})
        )
    if not layers:
        raise SsdoptError(
            package, "kernel launches in the generated wrapper's run_impl", "rebuild the engine"
        )
    return layers


# aoti_torch_{cpu,cuda}_* helpers that manage memory or streams rather than compute.
_NOT_KERNELS = {
    "delete_tensor_object",
    "assign_tensors_out",
    "item",
    "check_inf_and_nan",
    "caching_allocator",
    "stream_guard",
    "device_guard",
}


def _aten_name(shim: str) -> str:
    """C shim name -> aten op name: mkldnn__convolution_pointwise -> mkldnn._convolution_pointwise."""
    for namespace in ("mkldnn", "quantized"):
        if shim.startswith(namespace + "_"):
            return f"{namespace}.{shim[len(namespace) + 1 :]}"
    return shim


# ----------------------------------------------------------------------------------------------
# Fusion report: Conv -> BN -> activation chains of the exported graph against the artifact's calls


def program_topology(program: Any) -> list[dict[str, Any]]:
    """The exported graph as fusion.py's topology ({"name", "op_type", "domain", "inputs", "outputs"})."""
    onnx_names = {
        "conv2d": "Conv",
        "convolution": "Conv",
        "batch_norm": "BatchNormalization",
        "_native_batch_norm_legit_no_training": "BatchNormalization",
        **ACTIVATION_OPS,
    }
    nodes = []
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        target = str(node.target)
        short = target.split(".")[-2] if target.count(".") >= 2 else target
        if short == "getitem":  # tuple element of a multi-output op: same tensor as its parent
            parent = node.args[0]
            for entry in nodes:
                if entry["name"] == parent.name:
                    entry["outputs"].append(node.name)
            continue
        inputs = [a.name for a in node.args if hasattr(a, "name")]
        nodes.append(
            {
                "name": node.name,
                "op_type": onnx_names.get(short, short),
                "domain": "aten",
                "inputs": inputs,
                "outputs": [node.name],
            }
        )
    return nodes


def conv_chains(topology: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Conv -> BatchNormalization [-> activation] and Conv -> activation chains whose intermediate
    values have one consumer: {"conv", "bn" (or None), "activation" (or None), "activation_type"}."""
    consumers: dict[str, list[dict[str, Any]]] = {}
    for node in topology:
        if node["inputs"]:
            consumers.setdefault(node["inputs"][0], []).append(node)

    def only_consumer(node: dict[str, Any]) -> dict[str, Any] | None:
        users = [u for out in node["outputs"] for u in consumers.get(out, [])]
        return users[0] if len(users) == 1 else None

    chains = []
    activations = set(ACTIVATION_OPS.values())
    for conv in topology:
        if conv["op_type"] != "Conv":
            continue
        bn = only_consumer(conv)
        if bn is not None and bn["op_type"] != "BatchNormalization":
            bn = None
        act = only_consumer(bn or conv)
        if act is not None and act["op_type"] not in activations:
            act = None
        if bn is None and act is None:
            continue
        after = only_consumer(act or bn or conv)
        chains.append(
            {
                "conv": conv["name"],
                "bn": bn["name"] if bn else None,
                "activation": act["name"] if act else None,
                "activation_type": act["op_type"] if act else None,
                "next": after["name"] if after else None,  # e.g. the residual add a binary conv absorbs
                "next_type": after["op_type"] if after else None,
            }
        )
    return chains


def fusion_from_program(topology: list[dict[str, Any]], layers: list[LayerInfo]) -> dict[str, Any]:
    """Conv->BN[->act] / Conv->act chains of the exported graph, each marked fused when the compiled
    artifact computes it in one convolution call (BN folded into its weights by freezing, the
    activation its fused post-op). Only the artifact's own calls and source-node comments are used."""
    chains = conv_chains(topology)
    mentions: dict[str, list[LayerInfo]] = {}
    for layer in layers:
        for node in layer.fused_from:
            mentions.setdefault(node, []).append(layer)
    batchnorm_layers = [
        layer.name
        for layer in layers
        if any("batch_norm" in a for a in layer.attributes.get("original_aten", []))
    ]
    results = []
    for chain in chains:
        members = [chain["conv"], chain["bn"], chain["activation"]]
        covering = {layer.name: layer for node in members if node for layer in mentions.get(node, [])}
        absorbed = None
        if not covering and chain["activation"] is None and chain["next"]:
            # Inductor names only the last node a call computes: a conv whose comment names the add
            # after this chain computed the chain too (conv + BN folded + add as a binary post-op).
            candidates = [c for c in mentions.get(chain["next"], []) if "convolution" in c.type]
            if len(candidates) == 1:
                covering, absorbed = {candidates[0].name: candidates[0]}, chain["next_type"]
        layer = next(iter(covering.values()), None)
        if layer is None:
            status = "not traced"
        elif len(covering) == 1 and "convolution" in layer.type:
            fused_act = layer.attributes.get("activation") not in (None, "none", "")
            status = "fused" if chain["activation"] is None or fused_act else "not fused"
        else:
            status = "not fused"
        if chain["bn"] is None:
            batchnorm = None
        else:
            batchnorm = "separate kernel" if batchnorm_layers else "folded into the conv weights (freezing)"
        if absorbed:
            activation = f"no activation; the following {absorbed} fused as a conv post-op"
        elif chain["activation"] is None:
            activation = None
        elif status == "fused":
            activation = f"conv post-op '{layer.attributes.get('activation')}'"
        else:
            activation = "separate kernel"
        results.append(
            {
                **chain,
                "status": status,
                "runtime_layers": sorted(covering),
                "batchnorm": batchnorm,
                "activation_fate": activation,
            }
        )
    statuses = Counter(r["status"] for r in results)
    return {
        "reference_graph": "torch.export program (program.pt2), before freezing",
        "before": {
            "nodes": len(topology),
            "conv_nodes": sum(1 for n in topology if n["op_type"] == "Conv"),
            "batchnorm_nodes": sum(1 for n in topology if n["op_type"] == "BatchNormalization"),
            "conv_bn_act_chains": sum(1 for c in chains if c["bn"] and c["activation"]),
            "conv_bn_chains": sum(1 for c in chains if c["bn"] and not c["activation"]),
            "conv_act_chains": sum(1 for c in chains if not c["bn"]),
        },
        "after": {
            "layers": len(layers),
            "by_type": dict(Counter(layer.type for layer in layers).most_common()),
            "by_precision": dict(Counter(str(layer.precision) for layer in layers).most_common()),
            "batchnorm_kernels": len(batchnorm_layers),
        },
        "chains_fused": statuses.get("fused", 0),
        "chains_not_fused": statuses.get("not fused", 0),
        "chains_not_traced": statuses.get("not traced", 0),
        "chains": results,
    }


def fusion_markdown(report: dict[str, Any]) -> str:
    """fusion.md: before/after counts, then one row per chain."""
    before, after = report["before"], report["after"]
    convs_after = sum(v for k, v in after["by_type"].items() if "convolution" in k)
    lines = [
        "# Fusion report (torch-aoti)",
        "",
        f"Reference graph: {report['reference_graph']}",
        "",
        "| stage | nodes / calls | Conv | BatchNorm |",
        "|---|---|---|---|",
        f"| exported program | {before['nodes']} nodes | {before['conv_nodes']} | "
        f"{before['batchnorm_nodes']} |",
        f"| compiled package | {after['layers']} kernel/extern calls | {convs_after} | "
        f"{after['batchnorm_kernels']} |",
        "",
        f"Chains: Conv->BN->act {before['conv_bn_act_chains']}, Conv->BN {before['conv_bn_chains']}, "
        f"Conv->act {before['conv_act_chains']}; fused into one call: **{report['chains_fused']} of "
        f"{len(report['chains'])}** (not fused {report['chains_not_fused']}, not traced "
        f"{report['chains_not_traced']}).",
        "",
        "Calls by type: " + ", ".join(f"{k} {v}" for k, v in after["by_type"].items()),
        "",
        "| chain (conv / bn / activation) | status | call(s) | batchnorm | activation |",
        "|---|---|---|---|---|",
    ]
    for chain in report["chains"]:
        names = " / ".join(str(x or "-") for x in (chain["conv"], chain["bn"], chain["activation"]))
        calls = ", ".join(f"`{name}`" for name in chain["runtime_layers"]) or "-"
        lines.append(
            f"| {names} | {chain['status']} | {calls} | {chain['batchnorm'] or '-'} | "
            f"{chain['activation_fate'] or '-'} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The GPU probe: aoti_load_package in a child process

_PROBE = r"""
import faulthandler, json, sys, time
faulthandler.enable()  # a segfault prints the Python stack of every thread to stderr
def stage(name):
    print("SSDOPT_STAGE " + name, flush=True)
stage("import torch")
import torch
path, batch, size, device, library = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
stage("load op library")
if library == "-":
    pass  # a package without the custom op: load nothing
elif library:
    from ssdopt.ops.library import register_fake_decode_nms
    torch.ops.load_library(library)
    register_fake_decode_nms()
else:
    from ssdopt.ops.library import load_torch_ops
    load_torch_ops()
stage("aoti_load_package")
t0 = time.perf_counter()
model = torch._inductor.aoti_load_package(path)
t1 = time.perf_counter()
stage("run")
with torch.no_grad():
    out = model(torch.rand(batch, 3, size, size, device=device))
if device == "cuda":
    torch.cuda.synchronize()
stage("done")
print("SSDOPT_PROBE " + json.dumps({"load_s": t1 - t0, "run_s": time.perf_counter() - t1,
                                     "shapes": [list(o.shape) for o in out]}), flush=True)
"""


def probe_aoti_load(
    package: Path,
    image_size: int,
    *,
    device: str = "cuda",
    batch: int = 1,
    library: str | None = None,
    load_op: bool = True,
    timeout_s: float = 900.0,
) -> dict[str, Any]:
    """Load and run `package` in a child process, so a crash is reported (signal, last stage reached,
    faulthandler's stack) instead of killing this one. `library`: the op library to load there
    (default: ssdopt.ops.library.load_torch_ops()); load_op=False loads none."""
    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")])}
    command = [
        sys.executable,
        "-c",
        _PROBE,
        str(package),
        str(batch),
        str(image_size),
        device,
        (library or "") if load_op else "-",
    ]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout_s, env=env, check=False
        )
    except subprocess.TimeoutExpired as exc:
        stdout = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {
            "ok": False,
            "returncode": None,
            "signal": None,
            "error": f"timed out after {timeout_s} s",
            "last_stage": _last_stage(stdout),
            "seconds": round(time.perf_counter() - start, 1),
        }
    result: dict[str, Any] = {
        "ok": proc.returncode == 0,
        "returncode": proc.returncode,
        "signal": None,
        "last_stage": _last_stage(proc.stdout),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if proc.returncode < 0:
        try:
            result["signal"] = signal.Signals(-proc.returncode).name
        except ValueError:
            result["signal"] = str(-proc.returncode)
    for line in proc.stdout.splitlines():
        if line.startswith("SSDOPT_PROBE "):
            result.update(json.loads(line[len("SSDOPT_PROBE ") :]))
    if not result["ok"]:
        result["stderr_tail"] = "\n".join(proc.stderr.splitlines()[-40:])
    return result


def _last_stage(stdout: str) -> str | None:
    stages = [
        line[len("SSDOPT_STAGE ") :] for line in stdout.splitlines() if line.startswith("SSDOPT_STAGE ")
    ]
    return stages[-1] if stages else None
