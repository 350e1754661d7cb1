"""The one typed configuration object, read from defaults, a TOML file, VOXFLOW_* env and flags.

Later sources override earlier ones. Defaults serve a single machine out of the box.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping

from .errors import InvalidRequest


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineConfig:
    voice: str = "en_US-joe-medium"  # default voice name
    voice_dirs: tuple[Path, ...] = ()  # extra directories of Piper voices (*.onnx + *.onnx.json)
    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    half: bool = False  # float16 weights (GPU only)
    threads: int = 0  # torch intra-op threads; 0 = one per core
    workers: int = 1  # synthesis worker threads sharing the model(s)
    seed: int = 0  # default noise seed per stream: the same text and seed give the same audio
    max_text_chars: int = 100_000  # text one stream may receive

    @property
    def torch_threads(self) -> int:
        return self.threads or _cores()


_ENV_PREFIX = "VOXFLOW_"


def _coerce(name: str, kind: str, value: Any) -> Any:
    """kind is the field's annotation as text (postponed annotations)."""
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(value)
        if name == "voice_dirs":
            items = value.split(os.pathsep) if isinstance(value, str) else value
            return tuple(Path(p) for p in items if p)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"config {name}: cannot use {value!r}: {exc}") from exc


def load_config(file: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    path = file or env.get(_ENV_PREFIX + "CONFIG")
    if path:
        with open(path, "rb") as fh:
            values.update(tomllib.load(fh).get("engine", {}))
    for f in fields(EngineConfig):
        if (raw := env.get(_ENV_PREFIX + f.name.upper())) is not None:
            values[f.name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f.type for f in fields(EngineConfig)}
    unknown = set(values) - set(known)
    if unknown:
        raise InvalidRequest(f"unknown config keys: {', '.join(sorted(unknown))}")
    return replace(EngineConfig(), **{k: _coerce(k, known[k], v) for k, v in values.items()})
