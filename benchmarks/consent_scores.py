"""The measurements the consent check's thresholds are chosen from (voxflow/voices/consent.py).

Speaker check: the d-vector cosine between one clip, as long as a consent statement (3-8 s),
and a reference's embedding (`consent.reference_embedding`: the d-vector of the whole
reference, as `voxflow voices match` computes it).
- References: the four real speakers of tests/recordings.py (their `.reference()`, >= 75 s),
  and voxflow's synthetic voice "joe" (JOE_REFERENCE, 39 s).
- Same speaker: the speaker's held-out clips (24, never in the reference); for joe, 24 other
  sentences (JOE_CLIPS).
- Different speaker: every other speaker's clips, real and joe's, against each reference.
- Each clip clean and with white noise at 30 and 20 dB SNR (`--snrs`): noise moves scores, and a
  statement may be recorded on a worse microphone than its reference.
The table gives percentiles of each side, and the false-accept and false-reject rates at
consent.SPEAKER_THRESHOLD (and at a few others, for the choice).

Word check: the share of the statement's fixed words pocketsphinx hears in order
(`consent.check_words`), for joe reading the statement (4 voice names, 2 noise seeds, speeds
0.85 / 1 / 1.15, clean and white noise at 30 and 20 dB SNR), and for speech that is not the
statement (joe's JOE_CLIPS sentences, near misses of the statement, and allison's real
English prompts), which must be refused.

`speaker_scores` is what benchmarks/voices.py calls with matched-voice output.

    .venv/bin/python benchmarks/consent_scores.py [--skip speakers,words] [--snrs clean,30,20] [--out PATH]

The whole run takes about 13 minutes on 2 shared cores (each part about 6-7). The numbers and
the choice made from them are in voxflow/voices/consent.py's docstring.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
import time
from pathlib import Path

import numpy as np

from report import add_check_flag, finish, print_table, stamp, write_json

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from recordings import RATE, SPEAKERS, load  # noqa: E402

from voxflow.streaming.engine import Engine  # noqa: E402
from voxflow.voices import consent  # noqa: E402
from voxflow.voices.styles import Style  # noqa: E402

# joe's reference: ordinary sentences, none of them a consent statement.
JOE_REFERENCE = (
    "The museum opens at ten in the morning and closes at six.",
    "Our neighbours planted a row of apple trees along the fence.",
    "If the weather stays dry, we will walk to the harbour after lunch.",
    "He read the letter twice before he folded it into his pocket.",
    "The bakery on the corner sells fresh bread every day except Sunday.",
    "Please switch off the lights when you leave the meeting room.",
    "A strong wind blew the leaves across the empty car park.",
    "She has been learning to play the piano for almost three years.",
    "The train to the airport leaves from platform four every twenty minutes.",
    "We painted the kitchen a pale shade of green last summer.",
    "The children built a sandcastle and watched the tide wash it away.",
    "Every evening the old man fed the pigeons in the square.",
)
# joe's clips: sentence-length, like a statement, and never in JOE_REFERENCE.
JOE_CLIPS = (
    "The quick brown fox jumps over the lazy dog.",
    "Please leave a message after the tone and we will call you back.",
    "It is a quarter past nine and the train is running late.",
    "We can meet at the library next Tuesday afternoon.",
    "My sister bought a red bicycle at the market yesterday.",
    "Remember to water the plants before you go on holiday.",
    "The restaurant was full, so we ordered a pizza and ate at home.",
    "Turn left at the second traffic light and the hotel is on your right.",
    "Thank you for calling, all of our agents are busy at the moment.",
    "The river flooded the lower fields after a week of heavy rain.",
    "Could you send me the report before the end of the day?",
    "The concert was cancelled because the singer had a sore throat.",
    "I think the blue jacket looks better than the grey one.",
    "The doctor said I should drink more water and sleep longer.",
    "Our flight was delayed by two hours because of the fog.",
    "The library has a new collection of books about the ocean.",
    "He fixed the broken chair with some glue and a few nails.",
    "The shop will be closed on Monday for the public holiday.",
    "We watched the sunset from the top of the hill.",
    "The soup needs a little more salt and some black pepper.",
    "My phone battery is almost empty, can I borrow your charger?",
    "The teacher asked the students to write a short story.",
    "A small boat sailed slowly across the calm blue lake.",
    "They moved to a bigger house on the other side of town.",
)
# Said by joe instead of the statement: each must be refused by the word check.
NEAR_MISSES = (
    "I do not give permission for these recordings of my speech to be used to make a computer voice called anna.",
    "I never give permission for these recordings of my speech to be used to make a computer voice called anna.",
    "I give permission for these recordings of my speech to be used for medical research only.",
    "I refuse to let anyone use these recordings of my speech to make a computer voice.",
    "These recordings of my speech are private and must be deleted.",
    "Please make a computer voice from my speech.",
)
STATEMENT_NAMES = ("anna", "kestrel", "bob_2", "siobhan")
SPEEDS = (0.85, 1.0, 1.15)
WORD_SNRS = (None, 30.0, 20.0)
CANDIDATE_THRESHOLDS = (0.6, 0.65, 0.7, 0.75, 0.78, 0.8, 0.85)


def speaker_scores(audios: list[np.ndarray], rate: int, reference_embedding) -> list[float]:
    """The consent check's speaker score of each clip against a reference embedding."""
    return [consent.speaker_score(audio, rate, reference_embedding) for audio in audios]


def add_noise(audio: np.ndarray, snr_db: float | None, seed: int) -> np.ndarray:
    """White noise at `snr_db` below the clip's mean power (None: the clip unchanged)."""
    if snr_db is None:
        return audio
    rng = np.random.default_rng(seed)
    power = float(np.mean(np.square(audio, dtype=np.float64)))
    noise = rng.standard_normal(len(audio)) * np.sqrt(power / 10 ** (snr_db / 10))
    return (audio + noise).astype(np.float32)


def _snr_label(snr: float | None) -> str:
    return "clean" if snr is None else f"{snr:g}dB"


def joe_audio(engine: Engine, texts: tuple[str, ...], seed: int = 7) -> tuple[list[np.ndarray], int]:
    utterances = [engine.synthesize(text, seed=seed + i) for i, text in enumerate(texts)]
    return [u.audio for u in utterances], utterances[0].sample_rate


def percentiles(values: list[float]) -> dict[str, float]:
    v = np.asarray(values)
    return {
        "n": int(len(v)), "min": float(v.min()), "p1": float(np.percentile(v, 1)), "p5": float(np.percentile(v, 5)),
        "median": float(np.median(v)), "p95": float(np.percentile(v, 95)), "p99": float(np.percentile(v, 99)),
        "max": float(v.max()),
    }


def measure_speakers(engine: Engine, snrs: tuple[float | None, ...]) -> dict:
    """Scores of every clip against every reference, by reference, clip speaker and SNR."""
    references: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    clips: dict[str, tuple[list[np.ndarray], int]] = {}
    for name, speaker in SPEAKERS.items():
        reference = [load(p) for p in speaker.reference()]
        references[name] = consent.reference_embedding(reference, RATE)
        seconds[name] = round(sum(len(a) for a in reference) / RATE, 1)
        clips[name] = ([load(p) for p in speaker.held_out()], RATE)
    joe_ref, joe_rate = joe_audio(engine, JOE_REFERENCE, seed=101)
    references["joe"] = consent.reference_embedding(joe_ref, joe_rate)
    seconds["joe"] = round(sum(len(a) for a in joe_ref) / joe_rate, 1)
    clips["joe"] = joe_audio(engine, JOE_CLIPS, seed=7)

    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    for snr in snrs:
        label = _snr_label(snr)
        for ref_name, ref in references.items():
            for clip_name, (audios, rate) in clips.items():
                noisy = [add_noise(a, snr, seed=i) for i, a in enumerate(audios)]
                values = [round(s, 4) for s in speaker_scores(noisy, rate, ref)]
                scores.setdefault(label, {}).setdefault(ref_name, {})[clip_name] = values
    return {"reference_seconds": seconds, "scores": scores}


def rates_at(scores: dict, threshold: float, snr: str) -> dict[str, float]:
    same = [s for ref, by in scores[snr].items() for clip, v in by.items() if clip == ref for s in v]
    diff = [s for ref, by in scores[snr].items() for clip, v in by.items() if clip != ref for s in v]
    return {
        "false_reject": float(np.mean(np.asarray(same) < threshold)),
        "false_accept": float(np.mean(np.asarray(diff) >= threshold)),
        "false_rejects": int(np.sum(np.asarray(same) < threshold)),
        "false_accepts": int(np.sum(np.asarray(diff) >= threshold)),
        "same_n": len(same),
        "diff_n": len(diff),
    }


def measure_words(engine: Engine) -> dict:
    """Word-check scores for joe reading the statement and for speech that is not it."""
    statement = []
    for name, seed, speed in itertools.product(STATEMENT_NAMES, (1, 2), SPEEDS):
        u = engine.synthesize(consent.consent_statement(name), seed=seed, style=Style(speed=speed))
        for snr in WORD_SNRS:
            check = consent.check_words(consent.transcribe(add_noise(u.audio, snr, seed), u.sample_rate), name)
            statement.append({"name": name, "seed": seed, "speed": speed, "snr": _snr_label(snr), "score": round(check.score, 4),
                              "passed": check.passed, "missing": list(check.missing), "negations": list(check.negations),
                              "transcript": check.transcript})
    wrong = []
    for kind, texts in (("joe: near miss", NEAR_MISSES), ("joe: other sentence", JOE_CLIPS)):
        for i, text in enumerate(texts):
            u = engine.synthesize(text, seed=i)
            check = consent.check_words(consent.transcribe(u.audio, u.sample_rate))
            wrong.append({"kind": kind, "text": text, "score": round(check.score, 4), "passed": check.passed,
                          "negations": list(check.negations), "transcript": check.transcript})
    allison = SPEAKERS["allison"]
    for path in allison.held_out() + allison.reference()[:24]:
        check = consent.check_words(consent.transcribe(load(path), RATE))
        wrong.append({"kind": "allison: real prompt", "text": path.name, "score": round(check.score, 4),
                      "passed": check.passed, "negations": list(check.negations), "transcript": check.transcript})
    missed: dict[str, int] = {}
    for row in statement:
        for word in row["missing"]:
            missed[word] = missed.get(word, 0) + 1
    return {"statement": statement, "not_statement": wrong, "missed_words": dict(sorted(missed.items(), key=lambda kv: -kv[1]))}


def word_rows(words: dict) -> list[tuple[str, str, str]]:
    rows = []
    for snr in map(_snr_label, WORD_SNRS):
        got = [r for r in words["statement"] if r["snr"] == snr]
        s = [r["score"] for r in got]
        rows.append((f"words: statement by joe, {snr} ({len(got)})",
                     f"min {min(s):.2f} p10 {np.percentile(s, 10):.2f} median {np.median(s):.2f}; passed {sum(r['passed'] for r in got)}/{len(got)}",
                     f">= {consent.WORD_MATCH} to pass"))
    for kind in dict.fromkeys(r["kind"] for r in words["not_statement"]):
        got = [r for r in words["not_statement"] if r["kind"] == kind]
        s = [r["score"] for r in got]
        rows.append((f"words: {kind} ({len(got)})", f"max {max(s):.2f} median {np.median(s):.2f}; passed {sum(r['passed'] for r in got)}/{len(got)}",
                     "none passes"))
    top = ", ".join(f"{w} {n}" for w, n in list(words["missed_words"].items())[:6])
    rows.append(("words: most missed in the statement (count)", top or "none", ""))
    return rows


def speaker_rows(speakers: dict) -> list[tuple[str, str, str]]:
    rows = []
    scores = speakers["scores"]
    for snr, by_ref in scores.items():
        for ref, by_clip in by_ref.items():
            same = by_clip[ref]
            diff = [s for clip, v in by_clip.items() if clip != ref for s in v]
            worst = max((clip for clip in by_clip if clip != ref), key=lambda c: max(by_clip[c]))
            p_same, p_diff = percentiles(same), percentiles(diff)
            rows.append((f"speaker {snr}: {ref} ref, same speaker ({p_same['n']})",
                         f"min {p_same['min']:.3f} p5 {p_same['p5']:.3f} median {p_same['median']:.3f}", f">= {consent.SPEAKER_THRESHOLD}"))
            rows.append((f"speaker {snr}: {ref} ref, others ({p_diff['n']})",
                         f"max {p_diff['max']:.3f} ({worst}) p95 {p_diff['p95']:.3f} median {p_diff['median']:.3f}",
                         f"< {consent.SPEAKER_THRESHOLD}"))
        for threshold in CANDIDATE_THRESHOLDS:
            r = rates_at(scores, threshold, snr)
            mark = "  <- SPEAKER_THRESHOLD" if threshold == consent.SPEAKER_THRESHOLD else ""
            rows.append((f"speaker {snr}: at {threshold:.2f}",
                         f"false accept {r['false_accepts']}/{r['diff_n']} ({r['false_accept']:.1%}), "
                         f"false reject {r['false_rejects']}/{r['same_n']} ({r['false_reject']:.1%})", mark.strip()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip", default="", help="parts to leave out: speakers, words")
    parser.add_argument("--snrs", default="clean,30,20", help="speaker part: clean and/or white-noise SNRs in dB")
    parser.add_argument("--out", default="benchmarks/results/consent-scores.json")
    add_check_flag(parser)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    snrs = tuple(None if s == "clean" else float(s) for s in args.snrs.split(","))

    result: dict = {**stamp(), "speaker_threshold": consent.SPEAKER_THRESHOLD, "word_match": consent.WORD_MATCH,
                    "key_words": list(consent.KEY_WORDS), "statement": consent.consent_statement("NAME")}
    rows: list[tuple[str, str, str]] = []
    with contextlib.closing(Engine()) as engine:
        if "speakers" not in skip:
            started = time.perf_counter()
            speakers = measure_speakers(engine, snrs)
            result["speakers"] = speakers
            result["speaker_rates"] = {
                snr: {f"{t:.2f}": rates_at(speakers["scores"], t, snr) for t in CANDIDATE_THRESHOLDS} for snr in speakers["scores"]
            }
            result["speaker_summary"] = {
                snr: {ref: {"same": percentiles(by[ref]), "different": percentiles([s for c, v in by.items() if c != ref for s in v])}
                      for ref, by in by_ref.items()}
                for snr, by_ref in speakers["scores"].items()
            }
            rows += speaker_rows(speakers)
            print(f"speaker part: {time.perf_counter() - started:.0f} s", file=sys.stderr)
        if "words" not in skip:
            started = time.perf_counter()
            words = measure_words(engine)
            result["words"] = words
            rows += word_rows(words)
            print(f"word part: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    print_table(rows)
    write_json(args.out, result)
    # --check: at SPEAKER_THRESHOLD, no other speaker accepted and at most 5 % of the same
    # speaker's clean clips refused; every clean reading of the statement passes the word check
    # and nothing that is not the statement does.
    missed = []
    if "speakers" not in skip:
        clean = result["speaker_rates"]["clean"][f"{consent.SPEAKER_THRESHOLD:.2f}"]
        if clean["false_accepts"] or clean["false_reject"] > 0.05:
            missed.append(f"speaker check: {clean['false_accepts']} false accepts, {clean['false_reject']:.1%} false rejects (clean)")
    if "words" not in skip:
        if not all(w["passed"] for w in result["words"]["statement"] if w["snr"] == "clean"):
            missed.append("a clean reading of the statement failed the word check")
        if any(w["passed"] for w in result["words"]["not_statement"]):
            missed.append("speech that is not the statement passed the word check")
    finish(missed, args.check)


if __name__ == "__main__":
    main()
