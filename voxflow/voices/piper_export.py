"""Write a VitsSynthesizer as a Piper voice: the .onnx graph and its .onnx.json config.

The graph has Piper's interface (inputs `input`, `input_lengths`, `scales` and, for
multi-speaker voices, `sid`; output `output` [1, 1, 1, samples]) and draws its sampling noise
inside the graph, so Piper's runtime and `load_piper_onnx` can both read the result.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP
from torch import nn

from .vits import Scales, VitsSynthesizer, expand_by_durations

OPSET_VERSION = 15
QUALITIES = ("x_low", "low", "medium", "high")


class _PiperForward(nn.Module):
    """The model's `infer` with Piper's tensor interface and `randn_like` noise.

    `infer` draws noise from a torch.Generator, which has no ONNX form; RandomNormalLike does,
    and it is what Piper's own files contain. The model's parts are registered here under their
    own names so the file's initializers are named exactly like the model's state_dict.
    """

    synth: VitsSynthesizer

    def __init__(self, model: VitsSynthesizer) -> None:
        super().__init__()
        for name, part in model.named_children():
            self.add_module(name, part)
        # A plain reference, not a submodule: registering it would prefix every name.
        object.__setattr__(self, "synth", model)

    def forward(
        self, ids: torch.Tensor, lengths: torch.Tensor, scales: torch.Tensor, sid: torch.Tensor | None = None
    ) -> torch.Tensor:
        m = self.synth
        g = m.emb_g(sid).unsqueeze(-1) if m.emb_g is not None and sid is not None else None
        # Batches are single sentences; phonemes past the declared length are padding.
        hidden, mean, log_scale = m.enc_p(ids[:, : lengths[0]])
        durations = m.durations(hidden, torch.randn_like(hidden[:, :2]) * scales[2], scales[1], g)
        mean = expand_by_durations(mean, durations)
        log_scale = expand_by_durations(log_scale, durations)
        z = m.flow.reverse(mean + torch.randn_like(mean) * torch.exp(log_scale) * scales[0], g)
        return m.dec(z, g).unsqueeze(1)


def _language_code(espeak_voice: str) -> str:
    """Piper's locale form of an espeak voice: en-us -> en_US, fr -> fr, en-gb-x-rp -> en_GB."""
    parts = espeak_voice.split("-")
    if len(parts) > 1 and len(parts[1]) == 2:
        return f"{parts[0]}_{parts[1].upper()}"
    return parts[0]


def _config_json(
    model: VitsSynthesizer,
    sample_rate: int,
    espeak_voice: str,
    phoneme_id_map: Mapping[str, Sequence[int]],
    speaker_id_map: Mapping[str, int],
    quality: str,
) -> dict:
    defaults = Scales()
    return {
        "audio": {"sample_rate": sample_rate, "quality": quality},
        "espeak": {"voice": espeak_voice},
        "inference": {"noise_scale": defaults.noise, "length_scale": defaults.length, "noise_w": defaults.noise_w},
        "phoneme_type": "espeak",
        "phoneme_id_map": {phoneme: list(ids) for phoneme, ids in phoneme_id_map.items()},
        "num_symbols": model.cfg.n_vocab,
        "num_speakers": model.cfg.n_speakers,
        "speaker_id_map": dict(speaker_id_map),
        "hop_length": model.cfg.hop_length,
        "language": {"code": _language_code(espeak_voice)},
    }


def export_piper_onnx(
    model: VitsSynthesizer,
    path: str | Path,
    *,
    sample_rate: int = 22050,
    espeak_voice: str = "en-us",
    phoneme_id_map: Mapping[str, Sequence[int]] | None = None,
    speaker_id_map: Mapping[str, int] | None = None,
    quality: str = "medium",
) -> Path:
    """Write `path` (.onnx) and `path`.json; returns `path`."""
    path = Path(path)
    cfg = model.cfg
    phoneme_id_map = DEFAULT_PHONEME_ID_MAP if phoneme_id_map is None else phoneme_id_map
    speaker_id_map = {} if speaker_id_map is None else speaker_id_map
    if quality not in QUALITIES:
        raise ValueError(f"quality must be one of {QUALITIES}, not {quality!r}")
    if any(i >= cfg.n_vocab for ids in phoneme_id_map.values() for i in ids):
        raise ValueError(f"phoneme_id_map uses ids beyond the model's {cfg.n_vocab} symbols")
    if any(not 0 <= i < cfg.n_speakers for i in speaker_id_map.values()):
        raise ValueError(f"speaker_id_map uses ids beyond the model's {cfg.n_speakers} speakers")

    defaults = Scales()
    # Any length works for tracing; the phoneme and time axes are declared dynamic below.
    example: tuple[torch.Tensor, ...] = (
        torch.randint(0, cfg.n_vocab, (1, 20)),
        torch.tensor([20]),
        torch.tensor([defaults.noise, defaults.length, defaults.noise_w]),
    )
    names = ["input", "input_lengths", "scales"]
    if cfg.n_speakers > 1:
        example += (torch.tensor([0]),)
        names.append("sid")

    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of torch.export, but it is the
            # one Piper's voices were made with, and it traces the data-dependent frame count.
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # Its shape inference reports every reversed slice (torch.flip) it cannot fold.
            warnings.filterwarnings("ignore", "Constant folding", UserWarning)
            torch.onnx.export(
                _PiperForward(model),
                example,
                str(path),
                dynamo=False,
                opset_version=OPSET_VERSION,
                input_names=names,
                output_names=["output"],
                dynamic_axes={"input": {1: "phonemes"}, "output": {3: "time"}},
                # Folding would rename parameters it touches (e.g. the transposed relative
                # position tables); unfolded, every parameter keeps its module name, which is
                # what loaders map by. onnxruntime folds constants itself when it loads.
                do_constant_folding=False,
            )
    finally:
        model.train(was_training)

    config = _config_json(model, sample_rate, espeak_voice, phoneme_id_map, speaker_id_map, quality)
    path.with_name(path.name + ".json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return path
