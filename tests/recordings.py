"""Real speech recordings for the voice tests and benchmarks, fetched once and cached.

Debian's Asterisk prompt packages hold hundreds of short studio prompts per speaker, recorded
at 16 kHz (G.722) under Creative Commons licences (`Speaker.licence`; each package's copyright
file says so). They are downloaded
with `apt-get download` and unpacked into a cache, never installed and never committed; nothing
at run time reads them.

    SPEAKERS["allison"].reference()   # >= 60 s of prompts to match a voice to
    SPEAKERS["allison"].held_out()    # other prompts of the same speaker, never in the reference

    python tests/recordings.py fetch               # download all (make test does)
    python tests/recordings.py allison reference/  # a speaker's reference as WAV files

The cache is $VOXFLOW_RECORDINGS, or ~/.cache/voxflow/recordings.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import av
import numpy as np

RATE = 16_000
REFERENCE_SECONDS = 75.0  # the matcher asks for at least 60 s of speech; prompts carry some silence
HELD_OUT_CLIPS = 24


@dataclass(frozen=True)
class Speaker:
    name: str
    sex: str
    language: str
    package: str
    folder: str  # under usr/share/asterisk/sounds/ in the package
    licence: str  # from the package's copyright file

    def files(self) -> list[Path]:
        root = fetch(self.package) / "usr/share/asterisk/sounds" / self.folder
        # Only whole-sentence prompts: the letters, digits and phonetic alphabet are single words.
        skip = {"letters", "digits", "phonetic", "silence", "followme", "dictate"}
        return sorted(p for p in root.rglob("*.g722") if not skip & set(p.relative_to(root).parts[:-1]))

    def _split(self) -> tuple[list[Path], list[Path]]:
        # Every other file, in name order, until the reference is long enough; held-out clips
        # are taken from the rest, so the two never share a prompt.
        files = self.files()
        reference, seconds = [], 0.0
        for path in files[::2]:
            reference.append(path)
            seconds += len(load(path)) / RATE
            if seconds >= REFERENCE_SECONDS:
                break
        rest = [p for p in files if p not in set(reference)]
        # Sentence-length clips (3-8 s), as a listener would compare them.
        held_out = [p for p in rest if 3 * RATE <= len(load(p)) <= 8 * RATE][:HELD_OUT_CLIPS]
        return reference, held_out

    def reference(self) -> list[Path]:
        return self._split()[0]

    def held_out(self) -> list[Path]:
        return self._split()[1]


SPEAKERS = {
    s.name: s
    for s in (
        Speaker("allison", "female", "en-US", "asterisk-core-sounds-en-g722", "en_US_f_Allison", "Allison Smith, CC BY-SA 3.0"),
        Speaker("carlo", "male", "it-IT", "asterisk-core-sounds-it-g722", "it_IT_m_Carlo", "Carlo Flora, CC BY 3.0"),
        Speaker("june", "female", "fr-CA", "asterisk-core-sounds-fr-g722", "fr_CA_f_June", "June Wallack, CC BY-SA 3.0"),
        Speaker("ivr_ru", "female", "ru-RU", "asterisk-core-sounds-ru-g722", "ru_RU_f_IvrvoiceRU", "Maxim Topal, CC BY 3.0"),
    )
}


def cache_dir() -> Path:
    return Path(os.environ.get("VOXFLOW_RECORDINGS") or Path.home() / ".cache/voxflow/recordings")


@cache
def fetch(package: str) -> Path:
    """The unpacked package, downloaded on first use (about 10 MB each)."""
    target = cache_dir() / package
    if (target / ".complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        download = ["apt-get", "download", "-q", package]
        if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
            # A machine whose package lists were never fetched (a fresh container) knows no
            # package to download yet.
            sudo = [] if os.geteuid() == 0 else ["sudo"]
            subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True)
            subprocess.run(download, cwd=tmp, check=True, capture_output=True)
        (deb,) = Path(tmp).glob("*.deb")
        subprocess.run(["dpkg-deb", "-x", str(deb), str(target)], check=True)
    (target / ".complete").touch()
    return target


@cache
def load(path: Path, rate: int = RATE) -> np.ndarray:
    """A recording as float32 mono in [-1, 1] at `rate` Hz."""
    fmt = "g722" if path.suffix == ".g722" else None
    resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
    chunks = []
    with av.open(str(path), format=fmt) as container:
        for frame in container.decode(audio=0):
            chunks += [f.to_ndarray().ravel() for f in resampler.resample(frame)]
        chunks += [f.to_ndarray().ravel() for f in resampler.resample(None)]
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)


def export(speaker: str, directory: Path) -> list[Path]:
    """Write a speaker's reference prompts as 16 kHz WAV files (for `voxflow voices match`)."""
    import wave

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for path in SPEAKERS[speaker].reference():
        out = directory / (path.stem + ".wav")
        with wave.open(str(out), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(RATE)
            w.writeframes((np.clip(load(path), -1, 1) * 32767).astype("<i2").tobytes())
        written.append(out)
    return written


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["fetch"]:  # `make test` fetches them all before the tests start
        for speaker in SPEAKERS.values():
            print(f"{speaker.name}: {fetch(speaker.package)}")
        sys.exit()
    if len(sys.argv) != 3 or sys.argv[1] not in SPEAKERS:
        sys.exit(f"usage: python tests/recordings.py fetch | {{{','.join(SPEAKERS)}}} DIRECTORY")
    files = export(sys.argv[1], Path(sys.argv[2]))
    seconds = sum(len(load(p)) for p in SPEAKERS[sys.argv[1]].reference()) / RATE
    print(f"wrote {len(files)} files, {seconds:.0f} s, to {sys.argv[2]}")
    speaker = SPEAKERS[sys.argv[1]]
    print(f"source: Asterisk prompts recorded by {speaker.licence}, Debian package {speaker.package}")
