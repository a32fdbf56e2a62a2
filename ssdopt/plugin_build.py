"""`ssdopt plugin build`: compile the SSDDecodeNMS kernels and bindings into content-addressed folders.

Two builds, each cached by the sha256 of its sources and configuration:
  * native (CMake, plugins/nms/CMakeLists.txt): libssdopt_nms_cpu.so (C ABI), the CUDA kernel where
    nvcc is found, and the OpenVINO / TensorRT bindings where their SDKs are found
    -> build/plugins/<sha>/{lib/*.so, build.json}
  * torch (torch.utils.cpp_extension): the TORCH_LIBRARY(ssdopt) op, CPU and, where nvcc is found,
    CUDA -> build/plugins/torch-<sha>/{lib/ssdopt_nms_torch.so, build.json}
build.json records the compiler, the CUDA version and architectures and the sha256 of each library;
ssdopt/ops/library.py checks those hashes before loading anything.

The key holds what changes the output (versions of the compiler, CMake, OpenVINO, TensorRT headers, CUDA,
torch; flags; sources), never where a tool is installed: an engine built in one virtual env or checkout
must find the same key in another. The compile maps the source, SDK and build folders to fixed names
(-ffile-prefix-map) and CPU builds carry no build rpath, so the libraries' bytes do not hold those
locations either (a library's sha256 is what an engine records).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE_DIR = REPO_ROOT / "plugins" / "nms"
DEFAULT_BUILD_ROOT = REPO_ROOT / "build" / "plugins"
# SASS for Ampere (sm_80, sm_86), Ada (sm_89), Hopper (sm_90) and PTX for compute_90 (later GPUs JIT it).
CUDA_ARCHS = ("80", "86", "89", "90")
TORCH_EXTENSION_NAME = "ssdopt_nms_torch"
SOURCE_SUFFIXES = {".h", ".hpp", ".cuh", ".c", ".cc", ".cpp", ".cu", ".txt", ".cmake", ".in"}
# Configuration entries that say where a tool is, not what it is: given to CMake / the compiler, kept out
# of the key (their versions are in it).
LOCATION_FIELDS = ("cxx", "cmake", "cuda_home", "openvino_dir", "tensorrt_root")
# Bump when the way locations are kept out of the libraries' bytes changes (older builds embed them).
PATH_INDEPENDENCE = "file-prefix-map+no-cpu-rpath/1"
TENSORRT_HEADER_DIRS = (
    "/usr/include/x86_64-linux-gnu",
    "/usr/include/aarch64-linux-gnu",
    "/usr/local/tensorrt/include",
)


@dataclass(frozen=True)
class PluginBuild:
    """A finished build: its folder and the parsed build.json."""

    directory: Path
    record: dict

    def library(self, name: str) -> Path:
        """Path of library `name` (e.g. "libssdopt_nms_cpu.so"); SsdoptError when it was not built."""
        libraries = self.record.get("libraries", {})
        if name not in libraries:
            raise SsdoptError(
                self.directory / "build.json",
                f"a library named {name} (built: {sorted(libraries) or 'none'})",
                "install what its target needs (see 'targets' in build.json) and rerun `ssdopt plugin build`",
            )
        return self.directory / "lib" / name


def cuda_archs_from_env() -> tuple[str, ...]:
    """SSDOPT_CUDA_ARCHS="90" (comma or semicolon separated) narrows the arch list, e.g. for a quick test."""
    value = os.environ.get("SSDOPT_CUDA_ARCHS", "").strip()
    if not value:
        return CUDA_ARCHS
    archs = tuple(
        a.strip().replace("sm_", "").replace(".", "") for a in re.split(r"[,;\s]+", value) if a.strip()
    )
    if not all(a.isdigit() for a in archs):
        raise SsdoptError(
            "SSDOPT_CUDA_ARCHS", "compute capabilities such as '80,90'", "fix or unset the variable"
        )
    return archs


def find_cuda_home() -> Path | None:
    """The CUDA toolkit root: $CUDA_HOME, $CUDA_PATH, /usr/local/cuda, or the folder above nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    for candidate in candidates:
        if candidate and (Path(candidate) / "bin" / "nvcc").exists():
            return Path(candidate)
    return None


def require_tool(name: str, what: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise SsdoptError(name, f"{what} on PATH", fix)
    return path


def find_cxx_compiler() -> str:
    """The C++ compiler CMake and torch will use ($CXX, else c++/g++/clang++)."""
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(name):
            return str(shutil.which(name))
    raise SsdoptError(
        "CXX",
        "a C++17 compiler (g++ >= 9 or clang++ >= 10) on PATH",
        "install one, e.g. `apt-get install g++`, or set CXX",
    )


def tool_version(command: list[str]) -> str:
    """First line of `command --version`, or "unknown"."""
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[0].strip() if lines else "unknown"


def nvcc_version(cuda_home: Path) -> str:
    out = subprocess.run(
        [str(cuda_home / "bin" / "nvcc"), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


def plugin_sources(source_dir: Path = PLUGIN_SOURCE_DIR, under: tuple[str, ...] = ()) -> list[Path]:
    """Source files of the plugin (optionally only those under the given sub-folders), sorted."""
    roots = [source_dir / u for u in under] if under else [source_dir]
    files = set()
    for root in roots:
        for path in root.rglob("*"):
            if (
                path.is_file()
                and path.suffix in SOURCE_SUFFIXES
                and not any(p.startswith(".") for p in path.parts)
            ):
                files.add(path)
    return sorted(files)


def key_fields(config: dict) -> dict:
    """The configuration without its locations (LOCATION_FIELDS): what enters the content key."""
    return {k: v for k, v in config.items() if k not in LOCATION_FIELDS}


def content_key(files: list[Path], base: Path, config: dict) -> str:
    """sha256 over the relative path and bytes of each file and the JSON of the configuration."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(base)).encode())
        digest.update(b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    digest.update(json.dumps(config, sort_keys=True).encode())
    return digest.hexdigest()


def read_build(directory: Path) -> PluginBuild | None:
    """The build in `directory` when its build.json exists and every library is present."""
    record_path = directory / "build.json"
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if not all((directory / "lib" / name).exists() for name in record.get("libraries", {})):
        return None
    return PluginBuild(directory, record)


@contextlib.contextmanager
def staging_dir(build_root: Path, name: str) -> Iterator[Path]:
    """A temporary folder next to the final one; removed unless the caller renamed it away."""
    build_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=build_root))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path) -> Path:
    """Atomically move a finished build into place (a concurrent identical build may have won)."""
    try:
        os.replace(tmp, final)
    except OSError:
        if read_build(final) is None:
            raise
    return final


def record_libraries(lib_dir: Path) -> dict[str, dict]:
    return {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(lib_dir.glob("*.so"))
    }


def openvino_cmake_dir() -> Path | None:
    """OpenVINOConfig.cmake shipped inside the openvino wheel, when it is installed."""
    try:
        import openvino
    except ImportError:
        return None
    path = Path(openvino.__file__).parent / "cmake"
    return path if (path / "OpenVINOConfig.cmake").exists() else None


def openvino_version() -> str | None:
    """openvino.__version__ (it names the build, e.g. 2026.4.1-22982-e213a147257-...), None without it."""
    try:
        import openvino
    except ImportError:
        return None
    return str(openvino.__version__)


def tensorrt_header_version(root: str | None) -> str | None:
    """TensorRT version from NvInferVersion.h where the binding's CMake would find it, None without it."""
    candidates = [Path(root) / "include"] if root else []
    if os.environ.get("TRT_INCLUDE_DIR"):
        candidates.append(Path(os.environ["TRT_INCLUDE_DIR"]))
    candidates += [Path(d) for d in TENSORRT_HEADER_DIRS]
    for folder in candidates:
        header = folder / "NvInferVersion.h"
        if header.is_file():
            text = header.read_text(errors="replace")
            parts = [
                re.search(rf"#define (?:NV_TENSORRT|TRT)_{part}(?:_ENTERPRISE)? +(\d+)", text)
                for part in ("MAJOR", "MINOR", "PATCH")
            ]
            return ".".join(m.group(1) if m else "?" for m in parts)
    return None


def prefix_map_flags(locations: dict[str, Path | str | None]) -> list[str]:
    """-ffile-prefix-map=<folder>=<name> for each folder and its resolved path (CMake may see through a
    symlinked venv): __FILE__ and debug paths lose the location.

    A folder with whitespace is skipped (it would split the flag); its path may then stay in the bytes.
    """
    flags: list[str] = []
    for name, folder in locations.items():
        if not folder:
            continue
        for path in dict.fromkeys([str(folder), str(Path(folder).resolve())]):
            flag = f"-ffile-prefix-map={path}={name}"
            if not any(c.isspace() for c in path) and flag not in flags:
                flags.append(flag)
    return flags


def native_config(cuda: bool | None, bindings: bool, build_type: str) -> dict:
    """Everything besides the sources that changes the native build's output, plus where the tools are.

    The locations (LOCATION_FIELDS) are what CMake needs; key_fields() drops them from the key.
    """
    cuda_home = find_cuda_home() if cuda is not False else None
    if cuda is True and cuda_home is None:
        raise SsdoptError(
            "nvcc",
            "the CUDA toolkit (nvcc) under $CUDA_HOME, /usr/local/cuda or on PATH",
            "install the CUDA toolkit (>= 12) or set CUDA_HOME; or build CPU-only with --no-cuda",
        )
    compiler = find_cxx_compiler()
    ov_dir = openvino_cmake_dir() if bindings else None
    return {
        "kind": "native",
        "build_type": build_type,
        "cxx": compiler,
        "cxx_version": tool_version([compiler, "--version"]),
        "cuda_home": str(cuda_home) if cuda_home else None,
        "cuda_version": nvcc_version(cuda_home) if cuda_home else None,
        "cuda_archs": [f"sm_{a}" for a in cuda_archs_from_env()] + [f"compute_{cuda_archs_from_env()[-1]}"]
        if cuda_home
        else [],
        "bindings": bindings,
        "openvino_dir": str(ov_dir) if ov_dir else None,
        "openvino": openvino_version() if ov_dir else None,
        "tensorrt_root": os.environ.get("TENSORRT_ROOT") if bindings else None,
        "tensorrt_headers": tensorrt_header_version(os.environ.get("TENSORRT_ROOT")) if bindings else None,
        "platform": f"{platform.system()}-{platform.machine()}",
        "path_independence": PATH_INDEPENDENCE,
    }


def native_key(
    source_dir: Path = PLUGIN_SOURCE_DIR,
    cuda: bool | None = None,
    bindings: bool = True,
    build_type: str = "Release",
) -> tuple[str, dict]:
    """(content key, configuration) of the native build: the key is what build_root/<key[:16]> is named by."""
    cmake = require_tool("cmake", "CMake >= 3.18", "pip install cmake (or apt-get install cmake)")
    config = native_config(cuda, bindings, build_type)
    config["cmake"] = cmake
    config["cmake_version"] = tool_version([cmake, "--version"])
    return content_key(plugin_sources(source_dir), source_dir, key_fields(config)), config


def cmake_arguments(config: dict, source_dir: Path, cmake_dir: Path, lib_dir: Path) -> list[str]:
    """CMake configure arguments; the locations in `config` go here (not into the key)."""
    folders: dict[str, Path | str | None] = {"ssdopt_nms": source_dir, "build": cmake_dir.parent}
    if config.get("openvino_dir"):
        folders["openvino"] = Path(config["openvino_dir"]).parent  # <site-packages>/openvino
    args = [
        "-S",
        str(source_dir),
        "-B",
        str(cmake_dir),
        f"-DCMAKE_BUILD_TYPE={config['build_type']}",
        f"-DCMAKE_CXX_COMPILER={config['cxx']}",
        f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
        f"-DSSDOPT_NMS_BINDINGS={'ON' if config['bindings'] else 'OFF'}",
        f"-DCMAKE_CXX_FLAGS={' '.join(prefix_map_flags(folders))}",
    ]
    if not config["cuda_home"]:
        # The build rpath would name <venv>/openvino/libs; the extension is loaded into a process that
        # already has libopenvino (by soname). CUDA builds keep it: the TensorRT plugin links libcudart.
        args += ["-DCMAKE_SKIP_BUILD_RPATH=ON"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if config["cuda_home"]:
        archs = cuda_archs_from_env()
        arch_list = ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])
        args += [
            "-DSSDOPT_NMS_CUDA=ON",
            f"-DCMAKE_CUDA_COMPILER={config['cuda_home']}/bin/nvcc",
            f"-DCUDAToolkit_ROOT={config['cuda_home']}",
            f"-DSSDOPT_NMS_CUDA_ARCHITECTURES={arch_list}",
        ]
    else:
        args += ["-DSSDOPT_NMS_CUDA=OFF"]
    if config["openvino_dir"]:
        args += [f"-DOpenVINO_DIR={config['openvino_dir']}"]
    if config["tensorrt_root"]:
        args += [f"-DTENSORRT_ROOT={config['tensorrt_root']}"]
    return args


def run_logged(command: list[str], log: Path, what: str) -> None:
    """Run a build step, appending its output to `log`; SsdoptError with the tail of the log on failure."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n")
        f.flush()
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SsdoptError(
            what,
            f"a successful build (exit code {result.returncode}); log tail:\n{tail}",
            "install what the log says is missing, or report the compiler error",
        )


def build_native(
    source_dir: Path = PLUGIN_SOURCE_DIR,
    build_root: Path = DEFAULT_BUILD_ROOT,
    cuda: bool | None = None,
    bindings: bool = True,
    build_type: str = "Release",
    force: bool = False,
) -> PluginBuild:
    """CMake configure + build into build_root/<sha>/; returns the cached build when it exists.

    cuda: True requires nvcc, False skips it, None builds it where nvcc is found.
    """
    key, config = native_key(source_dir, cuda, bindings, build_type)
    cmake = config["cmake"]
    final = build_root / key[:16]
    existing = None if force else read_build(final)
    if existing is not None:
        return existing
    if force and final.exists():
        shutil.rmtree(final)
    started = time.time()
    with staging_dir(build_root, key[:16]) as tmp:
        lib_dir, cmake_dir, log = tmp / "lib", tmp / "cmake", tmp / "build.log"
        lib_dir.mkdir()
        run_logged([cmake, *cmake_arguments(config, source_dir, cmake_dir, lib_dir)], log, "cmake configure")
        jobs = str(max(1, os.cpu_count() or 1))
        run_logged([cmake, "--build", str(cmake_dir), "--parallel", jobs], log, "cmake build")
        summary_path = cmake_dir / "build_summary.json"
        targets = json.loads(summary_path.read_text()) if summary_path.exists() else {}
        record = {
            **config,
            "key": key,
            "targets": targets,
            "libraries": record_libraries(lib_dir),
            "seconds": round(time.time() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        shutil.rmtree(cmake_dir)
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        return PluginBuild(publish(tmp, final), record)


def torch_config(cuda: bool | None) -> dict:
    """Everything besides the sources that changes the torch op library."""
    try:
        import torch
    except ImportError as exc:
        raise SsdoptError("torch", "PyTorch installed", "pip install torch") from exc
    cuda_home = find_cuda_home() if cuda is not False and torch.version.cuda else None
    if cuda is True and cuda_home is None:
        raise SsdoptError(
            "nvcc",
            "a CUDA build of torch and the CUDA toolkit (nvcc) under $CUDA_HOME or /usr/local/cuda",
            "install the CUDA toolkit or set CUDA_HOME; or build with cuda=False",
        )
    if cuda is None and cuda_home is not None and not torch.cuda.is_available():
        cuda_home = None  # no GPU here: the CPU op builds in seconds rather than a minute
    archs = cuda_archs_from_env()
    compiler = find_cxx_compiler()
    return {
        "kind": "torch",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "cxx": compiler,
        "cxx_version": tool_version([compiler, "--version"]),
        "cuda_home": str(cuda_home) if cuda_home else None,
        "cuda_version": nvcc_version(cuda_home) if cuda_home else None,
        "cuda_archs": [f"sm_{a}" for a in archs] + [f"compute_{archs[-1]}"] if cuda_home else [],
        "platform": f"{platform.system()}-{platform.machine()}",
        "path_independence": PATH_INDEPENDENCE,
    }


def torch_key(source_dir: Path = PLUGIN_SOURCE_DIR, cuda: bool | None = None) -> tuple[str, dict]:
    """(content key, configuration) of the torch op build (build_root/torch-<key[:16]>)."""
    config = torch_config(cuda)
    files = plugin_sources(source_dir, ("include", "src", "bindings/torch"))
    return content_key(files, source_dir, key_fields(config)), config


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def torch_sources(source_dir: Path, with_cuda: bool) -> list[Path]:
    sources = [
        source_dir / "bindings/torch/decode_nms_op.cpp",
        source_dir / "src/common/validate.cpp",
        source_dir / "src/cpu/decode_nms_cpu.cpp",
    ]
    if with_cuda:
        sources += [
            source_dir / "bindings/torch/decode_nms_op_cuda.cpp",
            source_dir / "src/cuda/decode_nms_cuda.cu",
        ]
    return sources


def build_torch_ops(
    source_dir: Path = PLUGIN_SOURCE_DIR,
    build_root: Path = DEFAULT_BUILD_ROOT,
    cuda: bool | None = None,
    force: bool = False,
    verbose: bool = False,
) -> PluginBuild:
    """Build the torch op library into build_root/torch-<sha>/lib/ssdopt_nms_torch.so (cached).

    cuda: True requires nvcc, False builds CPU only, None adds CUDA where nvcc and a GPU are found.
    The library is built, not loaded: ssdopt.ops.library loads it after checking its sha256.
    """
    key, config = torch_key(source_dir, cuda)
    with_cuda = config["cuda_home"] is not None
    require_tool("ninja", "ninja (torch.utils.cpp_extension builds with it)", "pip install ninja")
    final = build_root / f"torch-{key[:16]}"
    existing = None if force else read_build(final)
    if existing is not None:
        return existing
    if force and final.exists():
        shutil.rmtree(final)

    started = time.time()
    with staging_dir(build_root, f"torch-{key[:16]}") as tmp:
        work, lib_dir, log = tmp / "work", tmp / "lib", tmp / "build.log"
        work.mkdir()
        lib_dir.mkdir()
        defines = ["-DSSDOPT_WITH_CUDA"] if with_cuda else []
        import torch

        prefix_maps = prefix_map_flags(
            {
                "ssdopt_nms": source_dir,
                "torch": Path(torch.__file__).parent,
                "python": sysconfig.get_paths().get("include"),
                "build": tmp,
            }
        )
        env = {}
        if with_cuda:
            archs = cuda_archs_from_env()
            env["CUDA_HOME"] = config["cuda_home"]
            env["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[:-1]}.{a[-1]}" for a in archs) + "+PTX"
        arguments = {
            "name": TORCH_EXTENSION_NAME,
            "sources": [str(s) for s in torch_sources(source_dir, with_cuda)],
            "extra_include_paths": [str(source_dir / "include"), str(source_dir / "src")],
            "extra_cflags": ["-O3", "-ffp-contract=off", *defines, *prefix_maps],
            "extra_cuda_cflags": ["-O3", "--fmad=false", "-std=c++17", *defines],
            "build_directory": str(work),
            "with_cuda": with_cuda,
            "is_python_module": False,
            "verbose": True,
        }
        # A child process builds it, so this process never loads the library from the staging folder.
        script = (
            "import json, sys\nfrom torch.utils import cpp_extension\n"
            "cpp_extension.load(**json.loads(sys.argv[1]))\n"
        )
        with patched_environ(env):
            run_logged([sys.executable, "-c", script, json.dumps(arguments)], log, "torch op build")
        if verbose:
            print(log.read_text())
        shutil.copy2(work / f"{TORCH_EXTENSION_NAME}.so", lib_dir / f"{TORCH_EXTENSION_NAME}.so")
        shutil.rmtree(work)
        record = {
            **config,
            "key": key,
            "libraries": record_libraries(lib_dir),
            "seconds": round(time.time() - started, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / "build.json").write_text(json.dumps(record, indent=2) + "\n")
        return PluginBuild(publish(tmp, final), record)


def build_all(
    build_root: Path = DEFAULT_BUILD_ROOT,
    cuda: bool | None = None,
    force: bool = False,
    torch_op: bool = True,
) -> list[PluginBuild]:
    """What `ssdopt plugin build` runs: the native build, then the torch op where torch is installed."""
    builds = [build_native(build_root=build_root, cuda=cuda, force=force)]
    if torch_op:
        try:
            import torch  # noqa: F401
        except ImportError:
            return builds
        builds.append(build_torch_ops(build_root=build_root, cuda=cuda, force=force))
    return builds


def summary_lines(build: PluginBuild) -> list[str]:
    """Human-readable lines about a build: folder, each library with its sha256, each target's status."""
    lines = [f"{build.directory}  ({build.record.get('kind')}, {build.record.get('seconds')} s)"]
    lines += [f"  {name}  sha256 {lib['sha256']}" for name, lib in build.record.get("libraries", {}).items()]
    lines += [f"  {target}: {status}" for target, status in build.record.get("targets", {}).items()]
    if build.record.get("cuda_version"):
        lines.append(f"  CUDA {build.record['cuda_version']}: {' '.join(build.record['cuda_archs'])}")
    return lines
