"""Voice weights kept in torch's own format after the first load of a Piper file.

Reading a Piper .onnx file means importing onnx (~0.6 s here, most of it ml_dtypes) and mapping
a few hundred graph tensors (~0.25 s). torch.load of the same weights, memory-mapped, takes
~0.03 s, so the first load writes them next to the voice file (`<voice>.onnx.voxflow.pt`), or
under the user's cache directory where the voice's directory is read-only. The copy records the
source's size and modification time and the copy format; one that does not match, or cannot be
read, is rebuilt from the source.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.nn import init

from .vits import GeneratorConfig, VitsConfig, VitsSynthesizer

_LOGGER = logging.getLogger(__name__)
FORMAT = 1
SUFFIX = ".voxflow.pt"


def _source_stamp(model_path: Path) -> dict[str, int]:
    stat = model_path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": FORMAT}


def _user_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voxflow" / "voices"


def cache_candidates(model_path: Path) -> list[Path]:
    """Where a copy may live, in order: beside the voice, then the user's cache directory."""
    resolved = model_path.resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return [resolved.with_name(resolved.name + SUFFIX), _user_cache_dir() / f"{resolved.stem}-{digest}{SUFFIX}"]


def _tuples(value: Any) -> Any:
    """asdict() turned the configs' tuples into lists; the frozen configs want them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _config_from_dict(raw: dict[str, Any]) -> VitsConfig:
    fields = {k: _tuples(v) for k, v in raw.items()}
    fields["generator"] = GeneratorConfig(**{k: _tuples(v) for k, v in raw["generator"].items()})
    return VitsConfig(**fields)


# The initialisers torch.nn's layers call from their constructors.
_INITIALISERS = ("kaiming_uniform_", "uniform_", "normal_")
_skip = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0


def _skippable(initialiser: Any) -> Any:
    @functools.wraps(initialiser)
    def maybe(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return tensor if getattr(_skip, "on", False) else initialiser(tensor, *args, **kwargs)

    return maybe


@contextlib.contextmanager
def _without_initial_weights() -> Iterator[None]:
    """Layers built on this thread meanwhile keep uninitialised weights, for a caller that
    fills every parameter (a strict load_state_dict checks it).

    Drawing the random initial weights took 0.14 s of a 0.43 s voice load, only for the copy to
    replace them, and that load is on the path of both cold starts. torch has no switch for it:
    building on the meta device skips the draws, but its first random fill there imports
    torch's compiler (~2 s). So torch.nn.init's initialisers are wrapped while any thread is
    in here, and skip only on the threads that are.
    """
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            for name in _INITIALISERS:
                setattr(init, name, _skippable(getattr(init, name)))
        _patch_users += 1
    _skip.on = True
    try:
        yield
    finally:
        _skip.on = False
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                for name in _INITIALISERS:
                    setattr(init, name, getattr(init, name).__wrapped__)


def _read(path: Path, stamp: dict[str, int]) -> VitsSynthesizer | None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if saved.get("source") != stamp:
            return None
        with _without_initial_weights():
            model = VitsSynthesizer(_config_from_dict(saved["config"]))
        model.load_state_dict(saved["state"])  # strict: every parameter comes from the copy
        return model.eval()
    except FileNotFoundError:
        return None
    except Exception as exc:  # a damaged or foreign file: rebuild it from the source
        _LOGGER.warning("ignoring voice weights copy %s: %s", path, exc)
        return None


def _write(paths: list[Path], model: VitsSynthesizer, stamp: dict[str, int]) -> None:
    payload = {"source": stamp, "config": dataclasses.asdict(model.cfg), "state": model.state_dict()}
    for path in paths:
        written = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Written aside and renamed: a reader never sees half a file, two writers never mix.
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as tmp:
                written = Path(tmp.name)
                torch.save(payload, tmp)
            written.chmod(0o644)  # like the voice file beside it, not the temporary file's 0600
            os.replace(written, path)
            return
        except OSError as exc:
            _LOGGER.debug("cannot keep voice weights at %s: %s", path, exc)
            if written is not None:
                written.unlink(missing_ok=True)


def load_voice_model(model_path: Path) -> VitsSynthesizer:
    """The voice's torch model: from its torch copy when one matches, else from the .onnx file."""
    try:
        stamp = _source_stamp(model_path)
    except OSError:
        return _from_onnx(model_path)  # says what is wrong with the path, as a VoiceFileError
    paths = cache_candidates(model_path)
    for path in paths:
        if (model := _read(path, stamp)) is not None:
            return model
    model = _from_onnx(model_path)
    _write(paths, model, stamp)
    return model


def _from_onnx(model_path: Path) -> VitsSynthesizer:
    # Imported here: onnx is needed only the first time a voice file is seen.
    from .piper_onnx import load_piper_onnx

    return load_piper_onnx(model_path)
