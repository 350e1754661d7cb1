"""Text to Piper phoneme ids through espeak-ng, with per-word id spans.

The ids are exactly what Piper feeds its VITS models: espeak-ng clause phonemes
with language-switch flags removed, the clause terminator appended (plus a space
after ``, : ;``), NFD-decomposed into single codepoints, then
``BOS PAD (phoneme PAD)* EOS``. Phonemes missing from the voice's id map are
skipped, with one warning per missing symbol.

Multi-sentence text:

* :meth:`EspeakPhonemizer.phonemize_sentences` returns one :class:`Phonemes` per
  espeak sentence, each with BOS/EOS, identical to Piper's per-sentence ids.
* :meth:`EspeakPhonemizer.phonemize` returns a single sequence in which the
  sentences are joined by one word-separator phoneme (``" "``).

Streaming: ``phonemize(a, eos=False).ids + phonemize(b, bos=False).ids`` is a
well-formed sequence. A chunk without BOS starts with the word separator (so the
last word of ``a`` and the first word of ``b`` stay apart), and a chunk without
EOS drops trailing separators (so a chunk ending in ``,`` does not produce two
separators in a row). Joining at a clause boundary therefore gives the same ids
as phonemizing the joined text.

Word spans: espeak merges words ("of the" -> "ʌvðə"), expands numbers and
symbols into several words ("$12.50" -> five), ends sentences at abbreviations
and changes function words with context, so its words cannot simply be zipped
with the input's (whitespace-separated) words. Every input word is also
phonemized on its own (cached) to learn which espeak words it is expected to
yield. The two word sequences are then matched in order, ignoring stress marks;
after a mismatch, the nearest point where they match again is found, and the
stretch in between is shared out: word for word when the counts agree,
otherwise by aligning the two stretches' phonemes character by character.
Words that produce no sound (punctuation such as "--") get no span.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from types import ModuleType

from ..errors import VoxflowError

_LOGGER = logging.getLogger(__name__)

BOS = "^"
EOS = "$"
PAD = "_"
WORD_SEPARATOR = " "

DEFAULT_MAX_CHARS = 10_000
"""Longest accepted text; far above a streamed chunk, yet bounded so one call
cannot hold the process-wide espeak lock for long."""

_PAUSE_TERMINATORS = frozenset(",:;")
_LANGUAGE_SWITCH = re.compile(r"\([^)]+\)")
# NUL makes the bridge raise and lone surrogates cannot be encoded to UTF-8; the
# other control characters only add noise. Tab, CR and LF are kept because
# espeak reads blank lines as sentence breaks, as Piper does.
_UNSPEAKABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_STRESS_SYMBOLS = "ˈˌ"
_STRESS_MARKS = str.maketrans("", "", _STRESS_SYMBOLS)
# How far (in words, on either side) a mismatch may extend before alignment
# gives up looking for the next matching word and shares out the rest.
_SYNC_WINDOW = 16
# Longest stretch (in characters, both sides) aligned character by character.
_MAX_ALIGNED_CHARS = 2_000

# espeak-ng keeps its voice and buffers in process-wide C globals. The lock
# also guards the (cheap) cache updates that go with each call.
_ESPEAK_LOCK = threading.Lock()
_bridge: ModuleType | None = None

_Clauses = tuple[tuple[str, str, bool], ...]


class PhonemizerError(VoxflowError, ValueError):
    code = "phonemizer_error"


@dataclass(frozen=True)
class WordSpan:
    text: str
    """The word as written in the input (whitespace-separated)."""
    start: int
    """Index into ``Phonemes.ids`` of the word's first id."""
    end: int
    """Exclusive end index; includes the PAD after the word's last phoneme."""


@dataclass(frozen=True)
class Phonemes:
    ids: tuple[int, ...]
    words: tuple[WordSpan, ...]
    """In order and non-overlapping; one per input word that produced phonemes."""
    phonemes: tuple[str, ...]
    """The symbols that produced ids, in order, without BOS/PAD/EOS: each one
    accounts for its own ids plus the PAD after them."""


@dataclass(frozen=True)
class _Sentence:
    symbols: tuple[str, ...]
    words: tuple[tuple[int, int], ...]
    """[start, end) of each espeak word in ``symbols``."""


@dataclass(frozen=True)
class _Analysis:
    sentences: tuple[_Sentence, ...]
    words: tuple[str, ...]
    spans: tuple[tuple[int, int] | None, ...]
    """Per input word, a range over the concatenated symbols of all espeak
    words (the "word stream"), or None when the word produced nothing."""


def _load_bridge() -> ModuleType:
    """Load piper's compiled espeak-ng bridge without importing ``piper``.

    Importing ``piper.espeakbridge`` would run ``piper/__init__.py``, which pulls
    in onnxruntime; the extension only needs its own file. Caller holds the lock.
    """
    global _bridge
    if _bridge is not None:
        return _bridge
    spec = importlib.util.find_spec("piper")
    if spec is None or not spec.submodule_search_locations:
        raise PhonemizerError("piper-tts is not installed; it provides espeak-ng")
    piper_dir = Path(next(iter(spec.submodule_search_locations)))
    candidates = [piper_dir / f"espeakbridge{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise PhonemizerError(f"espeak-ng bridge not found in {piper_dir}")
    loader = importlib.machinery.ExtensionFileLoader("espeakbridge", str(path))
    module_spec = importlib.util.spec_from_file_location("espeakbridge", path, loader=loader)
    assert module_spec is not None
    module = importlib.util.module_from_spec(module_spec)
    loader.exec_module(module)
    try:
        module.initialize(str(piper_dir / "espeak-ng-data"))
    except RuntimeError as exc:
        raise PhonemizerError(f"espeak-ng failed to initialise: {exc}") from exc
    _bridge = module
    return module


def _clause_symbols(clause: tuple[str, str, bool]) -> tuple[list[str], list[tuple[int, int]]]:
    """A clause's symbols as Piper builds them, and where its espeak words lie."""
    phonemes, terminator, _ = clause
    symbols = list(unicodedata.normalize("NFD", _LANGUAGE_SWITCH.sub("", phonemes)))
    words: list[tuple[int, int]] = []
    start = None
    for index, symbol in enumerate([*symbols, WORD_SEPARATOR]):
        if symbol == WORD_SEPARATOR:
            if start is not None:
                words.append((start, index))
            start = None
        elif start is None:
            start = index
    # Terminators are ASCII, so appending them after NFD equals Piper's NFD of
    # the whole string.
    symbols.extend(terminator)
    if terminator in _PAUSE_TERMINATORS:
        symbols.append(WORD_SEPARATOR)
    return symbols, words


def _split_sentences(clauses: _Clauses) -> tuple[_Sentence, ...]:
    sentences: list[_Sentence] = []
    symbols: list[str] = []
    words: list[tuple[int, int]] = []
    for clause in clauses:
        clause_symbols, clause_words = _clause_symbols(clause)
        words.extend((len(symbols) + a, len(symbols) + b) for a, b in clause_words)
        symbols.extend(clause_symbols)
        if clause[2] and symbols:
            sentences.append(_Sentence(tuple(symbols), tuple(words)))
            symbols, words = [], []
    if symbols:
        sentences.append(_Sentence(tuple(symbols), tuple(words)))
    return tuple(sentences)


def _espeak_words(sentences: Iterable[_Sentence]) -> list[tuple[str, ...]]:
    return [s.symbols[a:b] for s in sentences for a, b in s.words]


def _match_key(symbols: Iterable[str]) -> str:
    # Function words lose their stress in context ("are": ˈɑːɹ alone, ɑːɹ in a
    # sentence); comparing without stress marks lets them match.
    return "".join(symbols).translate(_STRESS_MARKS)


_SKIPS = [(di, dj) for di in range(_SYNC_WINDOW + 1) for dj in range(_SYNC_WINDOW + 1) if di or dj]


class _Aligner:
    """Maps each input word onto the text's espeak words.

    ``expected`` holds, per input word, the match keys of the espeak words it
    yields when phonemized alone; ``actual`` the symbols of each espeak word of
    the whole text. :meth:`run` returns, per input word, a [start, end) range in
    the word stream (the concatenation of ``actual``) or None; the ranges are
    monotonic and disjoint. Linear in the text for all but pathological input.
    """

    def __init__(self, expected: Sequence[Sequence[str]], actual: Sequence[Sequence[str]]) -> None:
        self.expected = [list(word) for word in expected]
        self.keys = [_match_key(word) for word in actual]
        self.symbols = [symbol for word in actual for symbol in word]
        self.bounds = [0]
        for word in actual:
            self.bounds.append(self.bounds[-1] + len(word))
        # Running totals of stress-free symbols, to compare stretches' lengths.
        self.wanted_length = [0]
        for keys in self.expected:
            self.wanted_length.append(self.wanted_length[-1] + sum(map(len, keys)))
        self.heard_length = [0]
        for key in self.keys:
            self.heard_length.append(self.heard_length[-1] + len(key))

    def run(self) -> list[tuple[int, int] | None]:
        spans: list[tuple[int, int] | None] = [None] * len(self.expected)
        i = j = 0
        while i < len(self.expected):
            if not self.expected[i]:
                i += 1
            elif self._matches(i, j):
                spans[i] = (self.bounds[j], self.bounds[j + len(self.expected[i])])
                j += len(self.expected[i])
                i += 1
            else:
                next_i, next_j = self._resync(i, j)
                spans[i:next_i] = self._share(range(i, next_i), j, next_j)
                i, j = next_i, next_j
        return spans

    def _matches(self, i: int, j: int) -> bool:
        want = self.expected[i]
        return bool(want) and self.keys[j : j + len(want)] == want

    def _confirmed(self, i: int, j: int) -> bool:
        """Whether the word after a match also matches (or nothing follows)."""
        j += len(self.expected[i])
        i += 1
        while i < len(self.expected) and not self.expected[i]:
            i += 1
        return i == len(self.expected) or j == len(self.keys) or self._matches(i, j)

    def _resync(self, i: int, j: int) -> tuple[int, int]:
        """The next point past a mismatch where both sequences match again.

        Of the candidates within reach, the best is followed by another match
        (a lone common word like "the" matches by chance too easily), spans
        stretches of similar length on both sides, and is near.
        """
        n_words, n_tokens = len(self.expected), len(self.keys)
        candidates = [
            (i + di, j + dj) for di, dj in _SKIPS if i + di < n_words and self._matches(i + di, j + dj)
        ]
        if n_words - i <= _SYNC_WINDOW and n_tokens - j <= _SYNC_WINDOW:
            candidates.append((n_words, n_tokens))

        def badness(candidate: tuple[int, int]) -> tuple[bool, float]:
            i2, j2 = candidate
            at_end = candidate == (n_words, n_tokens)
            wanted = self.wanted_length[i2] - self.wanted_length[i]
            heard = self.heard_length[j2] - self.heard_length[j]
            return not (at_end or self._confirmed(i2, j2)), abs(wanted - heard) + (i2 - i + j2 - j) / 2

        return min(candidates, key=badness, default=(n_words, n_tokens))

    def _share(self, words: range, first: int, stop: int) -> list[tuple[int, int] | None]:
        """Divide espeak words ``first:stop`` among the input ``words``."""
        spans: list[tuple[int, int] | None] = [None] * len(words)
        speaking = [k for k, word in enumerate(words) if self.expected[word]]
        if first == stop or not speaking:
            return spans
        expected = [self.expected[words[k]] for k in speaking]
        if sum(map(len, expected)) == stop - first:
            # As many espeak words as expected, only pronounced differently in
            # context: pair them up in order.
            j = first
            for k, keys in zip(speaking, expected):
                spans[k] = (self.bounds[j], self.bounds[j + len(keys)])
                j += len(keys)
            return spans
        # Otherwise align the sounds themselves (stress-free, word gaps as
        # spaces): merged words ("of the" -> ʌvðə) are cut where they join, and
        # words pronounced differently in context still land roughly in place.
        heard, positions = self._spell(first, stop)
        wanted = ""
        word_starts: list[int] = []
        for keys in expected:
            word_starts.append(len(wanted) + 1 if wanted else 0)
            wanted = f"{wanted} {' '.join(keys)}" if wanted else " ".join(keys)
        # The first word starts at the stretch's start even if espeak said
        # something extra before it.
        cuts = [self.bounds[first], *(positions[o] for o in _map_offsets(wanted, heard, word_starts[1:]))]
        for k, a, b in zip(speaking, cuts, [*cuts[1:], self.bounds[stop]]):
            spans[k] = (a, b) if a < b else None
        return spans

    def _spell(self, first: int, stop: int) -> tuple[str, list[int]]:
        """Espeak words ``first:stop`` as one string of match keys joined by
        spaces, and for each character (plus the end) the stream index where a
        word starting there would begin."""
        chars: list[str] = []
        positions: list[int] = []
        for j in range(first, stop):
            if j > first:
                chars.append(" ")
                positions.append(self.bounds[j])
            word_start = self.bounds[j]
            for index in range(self.bounds[j], self.bounds[j + 1]):
                symbol = self.symbols[index]
                if symbol in _STRESS_SYMBOLS:
                    continue
                chars.append(symbol)
                positions.append(word_start)
                # Any stress marks before the next sound go with it.
                word_start = index + 1
        positions.append(self.bounds[stop])
        return "".join(chars), positions


def _map_offsets(source: str, target: str, offsets: Sequence[int]) -> list[int]:
    """Where each (ascending) offset into ``source`` falls in ``target``."""
    if len(source) + len(target) <= _MAX_ALIGNED_CHARS:
        opcodes = SequenceMatcher(None, source, target, autojunk=False).get_opcodes()
    else:
        # Character alignment is quadratic; past this size stretch linearly.
        opcodes = [("replace", 0, len(source), 0, len(target))]
    mapped: list[int] = []
    op = 0
    for offset in offsets:
        while op < len(opcodes) and opcodes[op][2] <= offset:
            op += 1
        if op == len(opcodes):
            mapped.append(len(target))
            continue
        _, i1, i2, j1, j2 = opcodes[op]
        mapped.append(j1 + (offset - i1) * (j2 - j1) // (i2 - i1))
    return mapped


class EspeakPhonemizer:
    """Phonemizes text for one espeak-ng voice and one Piper phoneme id map.

    Thread-safe: espeak calls are serialised on a process-wide lock; their
    results are kept in an LRU cache of ``cache_size`` texts per instance.
    """

    def __init__(
        self,
        espeak_voice: str,
        phoneme_id_map: Mapping[str, Sequence[int]],
        cache_size: int = 2048,
        max_chars: int | None = DEFAULT_MAX_CHARS,
    ) -> None:
        missing = [s for s in (BOS, EOS, PAD) if not phoneme_id_map.get(s)]
        if missing:
            raise PhonemizerError(f"phoneme id map lacks ids for {missing}")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.espeak_voice = espeak_voice
        self.max_chars = max_chars
        self._id_map = {symbol: tuple(ids) for symbol, ids in phoneme_id_map.items()}
        self._cache_size = cache_size
        self._cache: OrderedDict[str, _Clauses] = OrderedDict()
        self._warned: set[str] = set()
        # Fail on an unknown voice now rather than on the first utterance.
        with _ESPEAK_LOCK:
            self._run_espeak([])

    def phonemize(self, text: str, *, bos: bool = True, eos: bool = True) -> Phonemes:
        """Phonemize ``text`` (all its sentences) into one id sequence."""
        analysis = self._analyse(text)
        symbols: list[str] = []
        stream: list[int] = []
        for sentence in analysis.sentences:
            if (symbols or not bos) and symbols[-1:] != [WORD_SEPARATOR]:
                symbols.append(WORD_SEPARATOR)
            stream.extend(len(symbols) + i for a, b in sentence.words for i in range(a, b))
            symbols.extend(sentence.symbols)
        while not eos and symbols[-1:] == [WORD_SEPARATOR]:
            symbols.pop()
        spans = [None if s is None else (stream[s[0]], stream[s[1] - 1] + 1) for s in analysis.spans]
        return self._to_ids(symbols, analysis.words, spans, bos=bos, eos=eos)

    def phonemize_sentences(self, text: str) -> list[Phonemes]:
        """One :class:`Phonemes` (with BOS and EOS) per espeak sentence of ``text``.

        A word whose span would cross into the next sentence (only possible
        where alignment had to guess) is cut at the end of its first sentence.
        """
        analysis = self._analyse(text)
        stream_sentence: list[int] = []
        stream_symbol: list[int] = []
        for index, sentence in enumerate(analysis.sentences):
            for a, b in sentence.words:
                stream_sentence.extend([index] * (b - a))
                stream_symbol.extend(range(a, b))
        per_sentence: list[list[tuple[int, int] | None]] = [
            [None] * len(analysis.words) for _ in analysis.sentences
        ]
        for word, span in enumerate(analysis.spans):
            if span is None:
                continue
            index = stream_sentence[span[0]]
            last = span[1] - 1
            while stream_sentence[last] != index:
                last -= 1
            per_sentence[index][word] = (stream_symbol[span[0]], stream_symbol[last] + 1)
        return [
            self._to_ids(list(sentence.symbols), analysis.words, spans, bos=True, eos=True)
            for sentence, spans in zip(analysis.sentences, per_sentence)
        ]

    def _analyse(self, text: str) -> _Analysis:
        if not isinstance(text, str):
            raise TypeError(f"text must be str, not {type(text).__name__}")
        if self.max_chars is not None and len(text) > self.max_chars:
            raise PhonemizerError(
                f"text has {len(text)} characters, more than max_chars={self.max_chars}; split it first"
            )
        text = _UNSPEAKABLE.sub("", text)
        words = tuple(text.split())
        if not words:
            return _Analysis((), (), ())
        clauses = self._espeak([text, *words])
        sentences = _split_sentences(clauses[text])
        expected = [
            [_match_key(symbols) for symbols in _espeak_words(_split_sentences(clauses[word]))]
            for word in words
        ]
        return _Analysis(sentences, words, tuple(_Aligner(expected, _espeak_words(sentences)).run()))

    def _espeak(self, texts: Sequence[str]) -> dict[str, _Clauses]:
        """espeak-ng clauses for each text, from the cache where possible."""
        results: dict[str, _Clauses] = {}
        with _ESPEAK_LOCK:
            for text in texts:
                if text in self._cache:
                    self._cache.move_to_end(text)
                    results[text] = self._cache[text]
            misses = [t for t in dict.fromkeys(texts) if t not in results]
            if misses:
                results.update(self._run_espeak(misses))
            if self._cache_size:
                for text in misses:
                    self._cache[text] = results[text]
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return results

    def _run_espeak(self, texts: Sequence[str]) -> dict[str, _Clauses]:
        """Caller holds the lock."""
        bridge = _load_bridge()
        try:
            # Set every time: another voice (or Piper itself) may have switched
            # the shared engine since our last call, and it costs ~0.1 ms.
            bridge.set_voice(self.espeak_voice)
            return {text: tuple(bridge.get_phonemes(text)) for text in texts}
        except RuntimeError as exc:
            raise PhonemizerError(f"espeak-ng ({self.espeak_voice}): {exc}") from exc

    def _to_ids(
        self,
        symbols: Sequence[str],
        words: Sequence[str],
        spans: Sequence[tuple[int, int] | None],
        *,
        bos: bool,
        eos: bool,
    ) -> Phonemes:
        """Piper's id layout, plus symbol spans turned into id spans."""
        pad = self._id_map[PAD]
        ids: list[int] = [*self._id_map[BOS], *pad] if bos else []
        kept: list[str] = []
        starts: list[int] = []
        ends: list[int] = []
        for symbol in symbols:
            starts.append(len(ids))
            symbol_ids = self._id_map.get(symbol)
            if symbol_ids is None:
                self._warn_missing(symbol)
            else:
                ids.extend(symbol_ids)
                ids.extend(pad)
                kept.append(symbol)
            ends.append(len(ids))
        if eos:
            ids.extend(self._id_map[EOS])
        word_spans = tuple(
            WordSpan(word, starts[span[0]], ends[span[1] - 1])
            for word, span in zip(words, spans)
            if span is not None and starts[span[0]] < ends[span[1] - 1]
        )
        return Phonemes(tuple(ids), word_spans, tuple(kept))

    def _warn_missing(self, symbol: str) -> None:
        if symbol not in self._warned:
            self._warned.add(symbol)
            _LOGGER.warning(
                "phoneme %r (U+%04X) is not in the id map of voice %s; skipping it",
                symbol,
                ord(symbol),
                self.espeak_voice,
            )
