"""A loaded voice: the torch model, its phonemizer and the facts from its JSON config."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import InvalidRequest, VoiceFileError
from .channels_last import to_channels_last
from .decoding import WindowDecoder
from .mixed_precision import narrow_flow, precision_dtype
from .phonemizer import EspeakPhonemizer
from .weights_cache import load_voice_model
from .vits import Scales, VitsSynthesizer

if TYPE_CHECKING:
    from .profile import MatchProfile


@dataclass(frozen=True)
class VoiceInfo:
    name: str
    language: str
    sample_rate: int
    quality: str
    espeak_voice: str
    speakers: tuple[str, ...]
    model_path: Path
    config_path: Path
    defaults: Scales = field(default_factory=Scales)
    num_speakers: int = 1
    phoneme_id_map: dict[str, list[int]] = field(default_factory=dict, repr=False, compare=False)
    speaker_ids: dict[str, int] = field(default_factory=dict, repr=False, compare=False)
    # A matched voice: the base voice's files with this profile's transform and watermark.
    match: MatchProfile | None = field(default=None, repr=False, compare=False)

    @classmethod
    def read(cls, model_path: Path, config_path: Path | None = None, name: str | None = None) -> "VoiceInfo":
        config_path = config_path or model_path.with_name(model_path.name + ".json")
        try:
            cfg = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise VoiceFileError(f"cannot read voice config {config_path}: {exc}") from exc
        phoneme_type = cfg.get("phoneme_type", "espeak")
        if phoneme_type != "espeak":
            raise VoiceFileError(f"{config_path}: phoneme_type {phoneme_type!r} is not supported (espeak only)")
        try:
            inference = cfg.get("inference", {})
            speaker_ids = {str(k): int(v) for k, v in cfg.get("speaker_id_map", {}).items()}
            return cls(
                name=name or model_path.name.removesuffix(".onnx"),
                language=cfg.get("language", {}).get("code") or cfg["espeak"]["voice"],
                sample_rate=int(cfg["audio"]["sample_rate"]),
                quality=cfg["audio"].get("quality", "unknown"),
                espeak_voice=cfg["espeak"]["voice"],
                speakers=tuple(sorted(speaker_ids, key=speaker_ids.__getitem__)),
                model_path=model_path,
                config_path=config_path,
                defaults=Scales(
                    noise=float(inference.get("noise_scale", 0.667)),
                    length=float(inference.get("length_scale", 1.0)),
                    noise_w=float(inference.get("noise_w", 0.8)),
                ),
                phoneme_id_map={str(k): [int(i) for i in v] for k, v in cfg["phoneme_id_map"].items()},
                num_speakers=int(cfg.get("num_speakers", max(len(speaker_ids), 1))),
                speaker_ids=speaker_ids,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise VoiceFileError(f"{config_path}: missing or malformed field {exc}") from exc

    def version(self) -> str:
        """What a cached rendering of this voice depends on: the model file's size and mtime
        (a replaced file must not replay old audio) and a matched voice's profile."""
        model = self.model_path.stat()
        version = f"{model.st_size}:{model.st_mtime_ns}"
        if self.match is not None:
            version += ":" + self.match.digest
        return version

    def speaker_id(self, speaker: str | int | None) -> int | None:
        """Resolve a speaker name or index; None for single-speaker voices. Read from the JSON
        alone, so a stream's speaker is checked when it opens, before the weights are loaded."""
        n = self.num_speakers
        if n <= 1:
            if speaker not in (None, 0, ""):
                raise InvalidRequest(f"voice {self.name} has a single speaker")
            return None
        if speaker is None or speaker == "":
            return 0
        if isinstance(speaker, str) and not speaker.isdecimal():
            if speaker not in self.speaker_ids:
                raise InvalidRequest(f"voice {self.name} has no speaker {speaker!r}")
            return self.speaker_ids[speaker]
        index = int(speaker)
        if not 0 <= index < n:
            raise InvalidRequest(f"speaker index must be in [0, {n - 1}], got {index}")
        return index


class Voice:
    def __init__(
        self,
        info: VoiceInfo,
        model: VitsSynthesizer,
        device: torch.device,
        dtype: torch.dtype,
        decoder_precision: str = "float32",
        flow_precision: str = "float32",
    ) -> None:
        self.info = info
        self.model = model
        if device.type == "cpu":
            # The acoustic step's encoder, duration predictor and flow run channels-last: ~20 %
            # faster, the same results (channels_last.py). The decoder gets its own copy below.
            for part in (model.enc_p, model.dp, model.flow):
                to_channels_last(part)
        self.flow_dtype = precision_dtype("flow_precision", flow_precision, device, dtype)
        if self.flow_dtype != dtype:
            narrow_flow(model, self.flow_dtype)
        self.device = device
        self.dtype = dtype
        # Every decode of synthesis goes through this (windows padded to shared shapes).
        self.decoder = WindowDecoder(model.dec, precision_dtype("decoder_precision", decoder_precision, device, dtype))
        # The engine bounds text per request (max_text_chars) and streams phonemize chunks of
        # at most a few hundred characters, so the phonemizer's own cap would only get in the
        # way of whole-text synthesis.
        self.phonemizer = EspeakPhonemizer(info.espeak_voice, info.phoneme_id_map, max_chars=None)
        # What every rendered decoder window goes through (decoder_blocks.WindowEffect).
        self.effect: Callable[[np.ndarray, int, int], np.ndarray] | None = (
            None if info.match is None else info.match.effect(info.sample_rate)
        )

    @classmethod
    def load(
        cls, info: VoiceInfo, device: str = "cpu", half: bool = False, decoder_precision: str = "float32", flow_precision: str = "float32"
    ) -> "Voice":
        target = torch.device(device)
        if target.type == "cuda" and not torch.cuda.is_available():
            raise InvalidRequest("device 'cuda' requested but torch sees no CUDA device")
        dtype = torch.float16 if half else torch.float32
        if half and target.type == "cpu":
            raise InvalidRequest("half precision needs a GPU device")
        model = load_voice_model(info.model_path)
        if model.cfg.n_speakers != info.num_speakers:
            # Speakers are checked against the JSON when a stream opens: it must tell the truth.
            raise VoiceFileError(f"{info.config_path}: num_speakers {info.num_speakers}, but the model has {model.cfg.n_speakers}")
        return cls(info, model.to(target, dtype), target, dtype, decoder_precision, flow_precision)

    @property
    def decoder_receptive_frames(self) -> int:
        """Latent frames of context HiFi-GAN needs on each side (computed from the voice's shape)."""
        return self.model.cfg.generator.receptive_frames

    @property
    def hop_length(self) -> int:
        return self.model.cfg.hop_length

    @property
    def sample_rate(self) -> int:
        return self.info.sample_rate
