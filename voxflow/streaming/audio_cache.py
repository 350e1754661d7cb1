"""A persistent cache of whole utterances: the frames and word timings of text spoken before.

Assistants repeat themselves ("One moment, please."), and a repeated utterance whose audio
depends only on its key can be replayed instead of synthesized: no model work, first audio
within a millisecond or so.

Storage is one SQLite file in WAL mode, shared safely by threads (one connection behind a
lock) and processes (WAL, short transactions, a busy timeout). Its size is bounded: entries
carry a logical clock of their last use, and a store evicts the least recently used entries
until the payload fits `max_bytes`. The cache is best effort: a failing or corrupted file never
fails a stream; an unreadable file is recreated empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
import unicodedata
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ..voices.styles import Style

_LOGGER = logging.getLogger(__name__)
T = TypeVar("T")

# Part of every key's digest: bump it when rendering changes, so old audio is never replayed.
_KEY_VERSION = 1
# PRAGMA user_version of the file; a file with another layout is emptied.
_SCHEMA_VERSION = 2  # 2: the voice column, so a removed voice's entries go with it
_CORRUPTION = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """The text part of a key: NFC, trimmed, each whitespace run one space.

    A run holding a line break stays one line break: the chunker ends a sentence there, so it
    changes how the text is spoken. Case is kept for the same reason: espeak reads "US" and
    "us", "IT" and "it" differently, and capitals decide how initials and acronyms are read.
    """
    text = unicodedata.normalize("NFC", text).strip()
    return _WHITESPACE.sub(lambda m: "\n" if "\n" in m.group() else " ", text)


@dataclass(frozen=True)
class CacheKey:
    """Everything the audio of an utterance spoken from a fresh context depends on."""

    voice: str
    voice_version: str  # VoiceInfo.version(): a replaced voice file or profile must not replay old audio
    style: Style
    speaker: int | None
    seed: int
    text: str  # normalized on construction
    sample_rate: int
    frame_ms: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", normalize_text(self.text))

    @property
    def digest(self) -> str:
        # Floats throughout: Style(speed=1) and Style(speed=1.0) are the same style.
        style = [float(self.style.speed), float(self.style.expressiveness), float(self.style.volume)]
        output = [self.sample_rate, self.frame_ms]
        fields = [_KEY_VERSION, self.voice, self.voice_version, style, self.speaker, self.seed, output, self.text]
        # ASCII JSON: text may hold lone surrogates, which have no UTF-8 form.
        return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


@dataclass(frozen=True)
class CachedWord:
    word: str
    start: float  # seconds from the utterance's first sample
    end: float


@dataclass(frozen=True)
class CachedUtterance:
    """An utterance as it left the framer: whole PCM16 frames at the output rate."""

    sample_rate: int
    frame_samples: int
    pcm: bytes
    words: tuple[CachedWord, ...]

    def frames(self) -> Iterator[bytes]:
        size = self.frame_samples * 2
        return (self.pcm[i : i + size] for i in range(0, len(self.pcm), size))

    @property
    def nbytes(self) -> int:
        """What the entry counts against the cache's size bound."""
        return len(self.pcm) + len(_encode_words(self.words))


@dataclass(frozen=True)
class CacheStats:
    entries: int
    bytes: int
    max_bytes: int
    hits: int  # lookups by this process since it opened the cache
    misses: int


def _encode_words(words: tuple[CachedWord, ...]) -> bytes:
    return json.dumps([[w.word, w.start, w.end] for w in words], separators=(",", ":")).encode()


def _decode_words(blob: bytes) -> tuple[CachedWord, ...]:
    return tuple(CachedWord(str(word), float(start), float(end)) for word, start, end in json.loads(blob))


def _checksum(pcm: bytes, words: bytes) -> int:
    # SQLite does not checksum pages: damage inside a blob would otherwise play as noise.
    return zlib.crc32(words, zlib.crc32(pcm))


_SCHEMA = (
    "DROP TABLE IF EXISTS utterances",
    """CREATE TABLE utterances (
        key TEXT PRIMARY KEY,
        voice TEXT NOT NULL,
        size INTEGER NOT NULL,
        last_used INTEGER NOT NULL,
        sample_rate INTEGER NOT NULL,
        frame_samples INTEGER NOT NULL,
        checksum INTEGER NOT NULL,
        words BLOB NOT NULL,
        pcm BLOB NOT NULL
    )""",
    # Covers MAX(last_used) for the clock, SUM(size) for the bound and the eviction order.
    "CREATE INDEX utterances_by_use ON utterances (last_used, size)",
    "CREATE INDEX utterances_by_voice ON utterances (voice)",
    f"PRAGMA user_version = {_SCHEMA_VERSION}",
)
_NEXT_USE = "(SELECT COALESCE(MAX(last_used), 0) + 1 FROM utterances)"
# Deletes the least recently used entries whose sizes add up to at least the excess (the parameter).
_EVICT = """DELETE FROM utterances WHERE key IN (
    SELECT key FROM (SELECT key, size, SUM(size) OVER (ORDER BY last_used) AS upto FROM utterances)
    WHERE upto - size < ?)"""


class AudioCache:
    """Thread- and process-safe; the async methods run the SQLite work on the cache's own thread."""

    def __init__(self, path: str | Path, max_bytes: int, *, max_text_chars: int = 400, timeout: float = 5.0) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        # Longer texts rarely repeat, and one would displace many short phrases.
        self.max_text_chars = max_text_chars
        self._timeout = timeout
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._file_id: tuple[int, int] | None = None
        self._hits = 0
        self._misses = 0
        # One thread keeps this process's lookups and stores in submission order: a lookup
        # made after a stream ended sees what that stream stored.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="voxflow-cache")
        with self._lock:
            try:
                self._open()
            except sqlite3.Error as exc:
                if exc.sqlite_errorcode not in _CORRUPTION:
                    raise
                self._recreate(exc)

    # -- blocking API (any thread) ---------------------------------------------------------

    def get(self, key: CacheKey) -> CachedUtterance | None:
        utterance = self._read(key)
        if utterance is not None:
            self._touch(key.digest)
        return utterance

    def put(self, key: CacheKey, utterance: CachedUtterance) -> None:
        size = utterance.nbytes
        if size > self.max_bytes:
            return
        words = _encode_words(utterance.words)
        checksum = _checksum(utterance.pcm, words)
        row = (key.digest, key.voice, size, utterance.sample_rate, utterance.frame_samples, checksum, words, utterance.pcm)

        def write(conn: sqlite3.Connection) -> None:
            with _write_transaction(conn):
                conn.execute(
                    "INSERT OR REPLACE INTO utterances (key, voice, size, last_used, sample_rate, frame_samples, checksum, words, pcm)"
                    f" VALUES (?, ?, ?, {_NEXT_USE}, ?, ?, ?, ?, ?)",
                    row,
                )
                excess = conn.execute("SELECT SUM(size) FROM utterances").fetchone()[0] - self.max_bytes
                if excess > 0:
                    conn.execute(_EVICT, (excess,))

        self._run(write, None)

    def forget_voice(self, voice: str) -> None:
        """Delete every entry of a voice (it was removed: its audio must not outlive it)."""
        self._run(lambda c: c.execute("DELETE FROM utterances WHERE voice = ?", (voice,)), None)

    def stats(self) -> CacheStats:
        entries, total = self._run(
            lambda c: c.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM utterances").fetchone(), (0, 0)
        )
        return CacheStats(entries, total, self.max_bytes, self._hits, self._misses)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        with self._lock:
            self._disconnect()

    # -- async API (event loop) -----------------------------------------------------------

    async def lookup(self, key: CacheKey) -> CachedUtterance | None:
        """get() off the loop; the recency update is queued behind it, off a hit's path."""
        try:
            utterance = await asyncio.get_running_loop().run_in_executor(self._thread, self._read, key)
        except RuntimeError:  # closed
            return None
        if utterance is not None:
            self._submit(self._touch, key.digest)
        return utterance

    def put_later(self, key: CacheKey, utterance: CachedUtterance) -> None:
        """put() on the cache thread, so a stream never waits for another process's write lock."""
        self._submit(self.put, key, utterance)

    async def settle(self) -> None:
        """Wait until the stores and updates queued so far are done."""
        await asyncio.wrap_future(self._thread.submit(lambda: None))

    # -- internals --------------------------------------------------------------------------

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self._thread.submit(fn, *args).add_done_callback(_log_failure)
        except RuntimeError:
            _LOGGER.debug("audio cache %s is closed; dropped %s", self.path, fn.__name__)

    def _read(self, key: CacheKey) -> CachedUtterance | None:
        digest = key.digest
        row = self._run(
            lambda c: c.execute(
                "SELECT sample_rate, frame_samples, checksum, words, pcm FROM utterances WHERE key = ?", (digest,)
            ).fetchone(),
            None,
        )
        utterance = None
        if row is not None:
            sample_rate, frame_samples, checksum, words, pcm = row
            try:
                if _checksum(pcm, words) != checksum:
                    raise ValueError("checksum mismatch")
                utterance = CachedUtterance(sample_rate, frame_samples, pcm, _decode_words(words))
            except (ValueError, TypeError) as exc:
                _LOGGER.warning("audio cache %s: dropping a damaged entry (%s)", self.path, exc)
                self._run(lambda c: c.execute("DELETE FROM utterances WHERE key = ?", (digest,)), None)
        with self._lock:
            if utterance is None:
                self._misses += 1
            else:
                self._hits += 1
        return utterance

    def _touch(self, digest: str) -> None:
        self._run(lambda c: c.execute(f"UPDATE utterances SET last_used = {_NEXT_USE} WHERE key = ?", (digest,)), None)

    def _run(self, op: Callable[[sqlite3.Connection], T], failed: T) -> T:
        """op on the connection; on any database failure log it and return `failed`."""
        with self._lock:
            try:
                conn = self._conn if self._conn is not None and not self._replaced() else self._reconnect()
                return op(conn)
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorcode", None) in _CORRUPTION:
                    self._recreate(exc)
                else:
                    _LOGGER.warning("audio cache %s: %s", self.path, exc)
            except OSError as exc:
                _LOGGER.warning("audio cache %s: %s", self.path, exc)
                self._disconnect()
            return failed

    def _reconnect(self) -> sqlite3.Connection:
        self._disconnect()
        return self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        try:
            _enable_wal(conn, self._timeout)
            # In WAL mode NORMAL cannot corrupt the file; a power cut may lose the last stores.
            conn.execute("PRAGMA synchronous = NORMAL")
            with _write_transaction(conn):
                if conn.execute("PRAGMA user_version").fetchone()[0] != _SCHEMA_VERSION:
                    for statement in _SCHEMA:
                        conn.execute(statement)
            stat = os.stat(self.path)
        except BaseException:
            conn.close()
            raise
        self._conn, self._file_id = conn, (stat.st_dev, stat.st_ino)
        return conn

    def _replaced(self) -> bool:
        """True when another process recreated (or someone deleted) the file this connection reads."""
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (stat.st_dev, stat.st_ino) != self._file_id

    def _recreate(self, cause: sqlite3.Error) -> None:
        _LOGGER.warning("audio cache %s is unreadable (%s); starting it afresh", self.path, cause)
        stale = self._file_id is None or not self._replaced()
        self._disconnect()
        try:
            # Another process may have recreated it already: then its new file is kept.
            if stale:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            self._open()
        except (sqlite3.Error, OSError) as exc:
            _LOGGER.warning("audio cache %s could not be recreated: %s", self.path, exc)

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._conn, self._file_id = None, None


def _enable_wal(conn: sqlite3.Connection, timeout: float) -> None:
    """Switches the file to WAL (a no-op once it is). The switch can fail at once with
    "database is locked" while another process opens the same new file: the connection's busy
    timeout does not cover it, so it is retried here within the same timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    # IMMEDIATE takes the write lock up front, so a busy file is waited for (timeout) at the
    # start instead of failing halfway through.
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite may have rolled back already (corruption, disk full)
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _log_failure(future: Future[Any]) -> None:
    if (exc := future.exception()) is not None:
        _LOGGER.error("audio cache task failed", exc_info=exc)
