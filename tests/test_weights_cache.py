"""Voice weights kept in torch's format: written once, read back equal, rebuilt when stale or damaged."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

from test_voice_shapes import CASES, random_model
from voxflow.errors import VoiceFileError
from voxflow.voices import piper_onnx
from voxflow.voices.piper_export import export_piper_onnx
from voxflow.voices.weights_cache import SUFFIX, _without_initial_weights, cache_candidates, load_voice_model


@pytest.fixture
def voice_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    case = CASES["medium_multi_speaker"]
    path = tmp_path / "voices" / "multi.onnx"
    path.parent.mkdir()
    export_piper_onnx(random_model(case.cfg), path, speaker_id_map=case.speaker_id_map)
    return path


@pytest.fixture
def onnx_loads(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every read of an .onnx file, recorded."""
    calls: list[Path] = []
    real = piper_onnx.load_piper_onnx

    def counting(path):
        calls.append(Path(path))
        return real(path)

    monkeypatch.setattr(piper_onnx, "load_piper_onnx", counting)
    return calls


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_second_load_reads_the_copy_beside_the_voice(voice_file: Path, onnx_loads: list[Path]) -> None:
    first = load_voice_model(voice_file)
    copy = voice_file.with_name(voice_file.name + SUFFIX)
    assert copy.exists() and oct(copy.stat().st_mode & 0o777) == oct(0o644)
    second = load_voice_model(voice_file)
    assert onnx_loads == [voice_file]  # the second load did not touch the .onnx file
    assert second.cfg == first.cfg and same_weights(first, second)
    assert not second.training
    ids = torch.tensor([[1, 20, 30, 40, 2]])
    with torch.inference_mode():
        a, _ = first.infer(ids, speaker_id=1)
        b, _ = second.infer(ids, speaker_id=1)
    assert torch.equal(a, b)


def test_layers_skip_their_initial_draws_only_on_the_loading_thread() -> None:
    """The copy fills every weight, so its load skips torch's random initialisation, and a
    layer another thread builds meanwhile is initialised as always."""

    def seeded_linear() -> torch.nn.Linear:
        torch.manual_seed(1)
        return torch.nn.Linear(8, 8)

    expected = seeded_linear()
    elsewhere: list[torch.nn.Linear] = []
    with _without_initial_weights():
        state = torch.random.get_rng_state()
        torch.nn.Conv1d(16, 16, 5)
        torch.nn.Embedding(10, 4)
        assert torch.equal(state, torch.random.get_rng_state())  # nothing drawn here
        other = threading.Thread(target=lambda: elsewhere.append(seeded_linear()))
        other.start()
        other.join()
    assert torch.equal(elsewhere[0].weight, expected.weight) and torch.equal(elsewhere[0].bias, expected.bias)
    assert not hasattr(torch.nn.init.uniform_, "__wrapped__")  # torch's own initialisers are back
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    torch.nn.Conv1d(16, 16, 5)
    assert not torch.equal(state, torch.random.get_rng_state())


def test_a_changed_voice_file_is_read_again(voice_file: Path, onnx_loads: list[Path]) -> None:
    load_voice_model(voice_file)
    stat = voice_file.stat()
    os.utime(voice_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    load_voice_model(voice_file)
    load_voice_model(voice_file)
    assert len(onnx_loads) == 2  # rebuilt once after the change, then read from the new copy


def test_a_damaged_copy_is_rebuilt(voice_file: Path, onnx_loads: list[Path]) -> None:
    reference = load_voice_model(voice_file)
    copy = voice_file.with_name(voice_file.name + SUFFIX)
    copy.write_bytes(b"not a torch file" * 100)
    rebuilt = load_voice_model(voice_file)
    assert len(onnx_loads) == 2 and same_weights(reference, rebuilt)
    assert same_weights(reference, load_voice_model(voice_file)) and len(onnx_loads) == 2


def test_the_user_cache_serves_where_the_voice_directory_cannot(voice_file: Path, onnx_loads: list[Path]) -> None:
    beside, user = cache_candidates(voice_file)
    beside.mkdir()  # a directory where the copy would go: writing there fails, even as root
    load_voice_model(voice_file)
    assert user.is_file() and user.is_relative_to(Path(os.environ["XDG_CACHE_HOME"]))
    load_voice_model(voice_file)
    assert len(onnx_loads) == 1
    assert not list(beside.parent.glob("*.tmp"))  # no temporary file left behind


def test_a_missing_voice_file_is_a_voice_file_error(tmp_path: Path) -> None:
    with pytest.raises(VoiceFileError):
        load_voice_model(tmp_path / "absent.onnx")
