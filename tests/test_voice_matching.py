"""Voice matching with real recordings: a profile is made from a consented reference, raises
similarity on both speaker encoders, is refused without consent, and speaks through the native
protocol with a detectable watermark (benchmarks/voices.py measures how much, against targets)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import parselmouth
import pytest

from recordings import RATE, SPEAKERS, export, load
from server_harness import run_server
from test_audio_cache import say_whole
from test_voices_http import native_seconds, native_speech
from voxflow.config import EngineConfig
from voxflow.errors import ConsentRefused, ConsentRequired, ForbiddenPath, InvalidRequest, VoiceConflict, VoiceFileError
from voxflow.streaming.audio_cache import AudioCache
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.transports.protocols.native_protocol import AudioPacket, Started
from voxflow.voices import matching, watermark
from voxflow.voices.consent import consent_statement
from voxflow.voices.make_match import ConsentInput, make_profile
from voxflow.voices.matching import EQ_GRID, Analysis, MatchParams, PitchStats, TuningGrid, VoiceTransform, analyse, long_term_envelope, mean_aperiodicity, tune
from voxflow.voices.profile import SUFFIX, MatchProfile
from voxflow.voices.registry import DEFAULT_VOICE, VoiceRegistry
from voxflow.voices.speaker_embedding import dvector_encoder, ge2e_encoder, similarity

SPEAKER = "allison"
NAME = "allison-matched"
ATTESTATION = "Asterisk prompts recorded by Allison Smith, CC BY-SA 3.0 (Debian asterisk-core-sounds-en-g722)"
# Two formant ratios, one of everything else: a real tuning run, small enough for a test.
SMALL_GRID = TuningGrid(formant_ratios=(1.1, 1.2), pitch_spreads=(1.0,), eq_strengths=(1.5,), start=(1.1, 1.0, 1.5), rounds=1)
SENTENCES = ("The quick brown fox jumps over the lazy dog.", "Please leave a message after the tone and we will call you back.")


def median_pitch(audio: np.ndarray, rate: int) -> float:
    f0 = parselmouth.Sound(audio.astype(np.float64), rate).to_pitch_ac(pitch_floor=50, pitch_ceiling=500).selected_array["frequency"]
    return float(np.median(f0[f0 > 0]))


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    e = Engine()
    try:
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def joe_speech(engine: Engine) -> tuple[np.ndarray, int]:
    utterances = [engine.synthesize(t) for t in SENTENCES]
    return np.concatenate([u.audio for u in utterances]), utterances[0].sample_rate


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return export(SPEAKER, tmp_path_factory.mktemp("reference"))


@pytest.fixture(scope="module")
def profile(engine: Engine, reference_files: list[Path]) -> MatchProfile:
    def speak(text: str) -> tuple[np.ndarray, int]:
        u = engine.synthesize(text)
        return u.audio, u.sample_rate

    return make_profile(NAME, DEFAULT_VOICE, reference_files, ConsentInput(attestation=ATTESTATION), speak, grid=SMALL_GRID)


# -- the transform ----------------------------------------------------------------------------


def test_the_transform_moves_pitch_to_the_target_and_keeps_the_length(joe_speech: tuple[np.ndarray, int]) -> None:
    audio, rate = joe_speech
    base = analyse(audio, rate)
    stats = PitchStats.of(base.f0)
    target = PitchStats(stats.mean + np.log(2.0), stats.std)  # an octave up
    flat = tuple(0.0 for _ in range(129))
    out = VoiceTransform(MatchParams(stats, target, 1.0, 1.0, flat, mean_aperiodicity(base)), rate)(audio)
    assert len(out) == len(audio) and out.dtype == np.float32
    assert median_pitch(out, rate) == pytest.approx(2 * median_pitch(audio, rate), rel=0.1)


def test_spans_too_short_for_a_pitch_window_pass_through(joe_speech: tuple[np.ndarray, int]) -> None:
    """A one-phoneme chunk with no context can be shorter than Praat's 60 ms pitch window."""
    audio, rate = joe_speech
    base = analyse(audio, rate)
    stats = PitchStats.of(base.f0)
    transform = VoiceTransform(MatchParams(stats, stats, 1.1, 1.0, tuple(0.0 for _ in range(129)), mean_aperiodicity(base)), rate)
    middle = len(audio) // 2
    for ms in (10, 50, 63, 70, 120):
        clip = audio[middle : middle + rate * ms // 1000]
        out = transform(clip)
        assert len(out) == len(clip)


def test_a_formant_ratio_above_one_raises_the_spectral_centroid(joe_speech: tuple[np.ndarray, int]) -> None:
    audio, rate = joe_speech
    base = analyse(audio, rate)
    stats, flat, ap = PitchStats.of(base.f0), tuple(0.0 for _ in range(129)), mean_aperiodicity(base)

    def centroid(ratio: float) -> float:
        out = VoiceTransform(MatchParams(stats, stats, ratio, 1.0, flat, ap), rate)(audio)
        power = np.abs(np.fft.rfft(out)) ** 2
        return float((np.fft.rfftfreq(len(out), 1 / rate) * power).sum() / power.sum())

    assert centroid(1.2) > 1.1 * centroid(1.0)


def test_the_unvoiced_equaliser_colours_only_unvoiced_frames(joe_speech: tuple[np.ndarray, int]) -> None:
    """A +12 dB shelf above 4 kHz on unvoiced frames: the voiced frames' spectra stay as the
    voiced equaliser leaves them, the unvoiced frames' gain the shelf."""
    audio, rate = joe_speech
    base = analyse(audio, rate)
    stats, flat, ap = PitchStats.of(base.f0), tuple(0.0 for _ in range(129)), mean_aperiodicity(base)
    shelf = tuple(12.0 if f > 4000 else 0.0 for f in EQ_GRID)
    plain = analyse(VoiceTransform(MatchParams(stats, stats, 1.0, 1.0, flat, ap), rate)(audio), rate, aperiodicity=False)
    shelved = analyse(VoiceTransform(MatchParams(stats, stats, 1.0, 1.0, flat, ap, unvoiced_eq_db=shelf), rate)(audio), rate, aperiodicity=False)

    def high_band_db(a, voiced: bool) -> float:
        db = long_term_envelope(a, voiced=voiced)
        return float(db[EQ_GRID > 4500].mean() - db[(EQ_GRID > 300) & (EQ_GRID < 3000)].mean())

    assert high_band_db(shelved, voiced=False) - high_band_db(plain, voiced=False) > 6
    assert abs(high_band_db(shelved, voiced=True) - high_band_db(plain, voiced=True)) < 2


def test_a_reference_without_voiceless_sounds_gets_the_voiced_curve_everywhere(joe_speech: tuple[np.ndarray, int], monkeypatch: pytest.MonkeyPatch) -> None:
    audio, rate = joe_speech
    voiced_only = Analysis(np.full(100, 120.0), np.ones((100, 513)), np.zeros(0), rate)
    with pytest.raises(ValueError, match="no unvoiced speech"):
        long_term_envelope(voiced_only, voiced=False)
    assert long_term_envelope(voiced_only).shape == EQ_GRID.shape

    measured = matching.long_term_envelope

    def as_if_all_voiced(analysis: Analysis, voiced: bool = True) -> np.ndarray:
        return measured(analysis, voiced) if voiced else long_term_envelope(voiced_only, voiced=False)

    monkeypatch.setattr(matching, "long_term_envelope", as_if_all_voiced)
    half = len(audio) // 2
    result = tune(audio[:half], audio[half:], rate, audio, rate, lambda a, r: np.ones(4) / 2, SMALL_GRID)
    assert result.params.unvoiced_eq_db is None and len(result.params.eq_db) == len(EQ_GRID)


def test_a_profile_made_before_the_unvoiced_equaliser_reads_and_sounds_as_before(profile: MatchProfile, joe_speech: tuple[np.ndarray, int]) -> None:
    """Older profile files have no unvoiced curve: the voiced equaliser colours every frame,
    the transform they were tuned with."""
    audio, rate = joe_speech
    data = profile.params.to_json()
    assert data.pop("unvoiced_eq_db") != data["eq_db"]
    old = MatchParams.from_json(data)
    assert old.unvoiced_eq_db is None
    clip = audio[: rate * 2]
    assert np.array_equal(VoiceTransform(old, rate)(clip), VoiceTransform(replace(old, unvoiced_eq_db=old.eq_db), rate)(clip))
    with pytest.raises(ValueError, match="unvoiced_eq_db must have 129 values"):
        MatchParams.from_json({**data, "unvoiced_eq_db": [0.0] * 5})


# -- making a profile --------------------------------------------------------------------------


def test_a_profile_raises_similarity_on_both_encoders(engine: Engine, profile: MatchProfile, tmp_path: Path) -> None:
    """Judged on held-out clips that neither the analysis nor the tuning saw, by the tuning's
    encoder (d-vector) and by an independent one (GE2E)."""
    registry = VoiceRegistry([tmp_path])
    registry.add_match(profile)
    held_out = np.concatenate([load(p) for p in SPEAKERS[SPEAKER].held_out()])
    e = Engine(EngineConfig(voice_dirs=(tmp_path,)))
    try:
        base = np.concatenate([e.synthesize(t).audio for t in SENTENCES])
        matched = np.concatenate([e.synthesize(t, voice=NAME).audio for t in SENTENCES])
    finally:
        e.close()
    rate = engine.voice().sample_rate
    for encoder in (dvector_encoder(), ge2e_encoder()):
        target = encoder.embed(held_out, RATE)
        before, after = similarity(target, encoder.embed(base, rate)), similarity(target, encoder.embed(matched, rate))
        assert after > before + 0.1, (encoder.name, before, after)
    assert profile.similarity > profile.base_similarity
    assert profile.reference_seconds >= 60


def test_the_profile_file_keeps_the_consent_record_and_the_embedding(profile: MatchProfile, tmp_path: Path) -> None:
    path = profile.write(tmp_path)
    assert path.name == NAME + SUFFIX
    data = json.loads(path.read_text())
    assert data["consent"]["method"] == "attested" and ATTESTATION in json.dumps(data["consent"])
    assert data["consent"]["watermark_id"] == watermark.WATERMARK_ID
    again = MatchProfile.read(path)
    assert again == profile
    assert len(again.embedding) > 100 and abs(np.linalg.norm(again.embedding) - 1) < 1e-3


def test_a_profile_file_named_for_another_voice_is_refused(profile: MatchProfile, tmp_path: Path) -> None:
    path = profile.write(tmp_path)
    path.rename(tmp_path / ("other" + SUFFIX))
    with pytest.raises(VoiceFileError, match="must be"):
        MatchProfile.read(tmp_path / ("other" + SUFFIX))


def test_no_profile_without_consent(engine: Engine, reference_files: list[Path]) -> None:
    def never(text: str):
        raise AssertionError("nothing may be synthesized before consent is checked")

    with pytest.raises(ConsentRequired, match="consent"):
        make_profile(NAME, DEFAULT_VOICE, reference_files, ConsentInput(), never)
    with pytest.raises(ConsentRequired):
        make_profile(NAME, DEFAULT_VOICE, reference_files, ConsentInput(Path("x.wav"), "both"), never)


def test_a_statement_in_another_voice_is_refused(engine: Engine, reference_files: list[Path], tmp_path: Path) -> None:
    """joe reads the statement word for word; the reference is Allison: not her consent."""
    import soundfile

    statement = engine.synthesize(consent_statement(NAME))
    path = tmp_path / "statement.wav"
    soundfile.write(path, statement.audio, statement.sample_rate)
    with pytest.raises(ConsentRefused, match="speaker"):
        make_profile(NAME, DEFAULT_VOICE, reference_files, ConsentInput(statement=path), lambda t: pytest.fail("synthesized"))


def test_too_little_reference_speech_is_refused(engine: Engine, reference_files: list[Path]) -> None:
    with pytest.raises(InvalidRequest, match="at least 60 s"):
        make_profile(NAME, DEFAULT_VOICE, reference_files[:3], ConsentInput(attestation=ATTESTATION), lambda t: pytest.fail("synthesized"))


# -- the registry and a live server -------------------------------------------------------------


def test_the_registry_keeps_the_base_voice_while_a_matched_voice_needs_it(profile: MatchProfile, tmp_path: Path) -> None:
    registry = VoiceRegistry([tmp_path])
    registry.add_match(profile)
    again = VoiceRegistry([tmp_path])  # as a restarted server finds it
    status = again.status(NAME)
    assert status.source == "matched" and status.info.match == profile
    assert status.info.model_path == again.info(DEFAULT_VOICE).model_path
    with pytest.raises(VoiceConflict, match="already exists"):
        again.add_match(profile)
    with pytest.raises(VoiceConflict):  # what `voxflow voices match` asks before its analysis
        again.check_new_name(NAME)
    with pytest.raises(ForbiddenPath):
        VoiceRegistry([]).check_new_name("fresh")
    again.remove(NAME)
    assert not (tmp_path / (NAME + SUFFIX)).exists()
    assert again.info(DEFAULT_VOICE).model_path.exists()  # the base's files stay


async def test_a_matched_voice_streams_over_the_native_protocol_with_its_watermark(profile: MatchProfile, tmp_path: Path) -> None:
    VoiceRegistry([tmp_path]).add_match(profile)
    engine = Engine(EngineConfig(voice_dirs=(tmp_path,)), concurrent=True)
    try:
        with run_server(engine) as server:
            matched = await native_speech(server, NAME)
            base = await native_speech(server, DEFAULT_VOICE)
            listed = {v["name"]: v for v in httpx.get(f"{server.http}/v1/voices", timeout=30).json()["voices"]}
    finally:
        engine.close()

    def audio(events: list) -> tuple[np.ndarray, int]:
        rate = next(e for e in events if isinstance(e, Started)).sample_rate
        pcm = b"".join(e.pcm for e in events if isinstance(e, AudioPacket))
        return np.frombuffer(pcm, "<i2").astype(np.float32) / 32768, rate

    assert listed[NAME]["source"] == "matched" and listed[DEFAULT_VOICE]["match"] is None
    match = listed[NAME]["match"]
    assert match["base_voice"] == DEFAULT_VOICE and match["similarity"]["matched"] > match["similarity"]["base"]
    assert match["consent"]["method"] == "attested" and match["consent"]["attestation"] == ATTESTATION
    assert match["consent"]["watermark_id"] == watermark.WATERMARK_ID and len(match["consent"]["reference_embedding"]) > 100
    assert native_seconds(matched) == pytest.approx(native_seconds(base), rel=0.05)
    assert watermark.detect(*audio(matched)).found
    assert not watermark.detect(*audio(base)).found
    assert median_pitch(*audio(matched)) > 1.5 * median_pitch(*audio(base))  # Allison's ~190 Hz against joe's ~95


async def test_removing_a_matched_voice_forgets_its_cached_audio(profile: MatchProfile, tmp_path: Path) -> None:
    VoiceRegistry([tmp_path]).add_match(profile)
    cache = AudioCache(tmp_path / "cache.sqlite3", 64 * 2**20)
    engine = Engine(EngineConfig(voice_dirs=(tmp_path,)), cache=cache)
    try:
        for voice in (NAME, DEFAULT_VOICE):
            events, _, _ = await say_whole(engine, "Good morning.", voice=voice)
            assert any(isinstance(e, AudioFrame) for e in events)
        await cache.settle()
        assert cache.stats().entries == 2
        engine.remove_voice(NAME)
        assert cache.stats().entries == 1  # the default voice's stays
        assert NAME not in {i.name for i in engine.voices.infos()}
    finally:
        engine.close()
        cache.close()

