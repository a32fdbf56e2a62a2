"""params.yaml: the one source of defaults for the CLI, the flows and DVC."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ssdopt.errors import SsdoptError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """Read params.yaml; a missing file gives an empty dict (callers fall back to built-ins)."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SsdoptError(path, f"valid YAML ({exc})", "fix the syntax or restore it with git") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SsdoptError(path, "a mapping of sections (model, generate, ...)", "restore it with git")
    return data


def section(name: str, path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """One section of params.yaml, or {} when absent."""
    value = load_params(path).get(name, {})
    return value if isinstance(value, dict) else {}


def pick(value: Any, params: dict[str, Any], key: str, default: Any) -> Any:
    """CLI value if given, else params.yaml's `key`, else the built-in default."""
    if value is not None:
        return value
    return params.get(key, default)
