"""Prometheus metrics: an observer fed by the transports when a stream ends, never in the data path."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..streaming.stream import StreamMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)


class ServerMetrics:
    """One registry per server, so several servers (tests) do not share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.chunking = Histogram(
            "voxflow_chunking_seconds", "First text received to first speakable chunk", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.acoustic = Histogram(
            "voxflow_acoustic_step_seconds", "Phonemes and acoustic step per chunk", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_block = Histogram(
            "voxflow_first_block_seconds", "Decoding a stream's first block", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.first_frame_sent = Histogram(
            "voxflow_first_frame_sent_seconds", "First text received to first audio handed to the socket",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.active_streams = Gauge("voxflow_active_streams", "Synthesis streams in progress", registry=r)
        self.frames_sent = Counter("voxflow_frames_sent", "Audio frames sent to clients", registry=r)
        self.cache_hits = Counter("voxflow_cache_hits", "Audio cache hits", registry=r)
        self.cache_misses = Counter("voxflow_cache_misses", "Audio cache misses", registry=r)
        self.errors = Counter("voxflow_errors", "Errors reported to clients", ["code"], registry=r)
        self.streams = Counter("voxflow_streams", "Streams ended", ["reason"], registry=r)

    def stream_ended(self, metrics: StreamMetrics, reason: str, first_sent: float | None) -> None:
        """Record one stream's figures; first_sent is when its first frame went to the socket."""
        self.streams.labels(reason).inc()
        if metrics.first_text is not None and metrics.first_chunk is not None:
            self.chunking.observe(metrics.first_chunk - metrics.first_text)
        for seconds in metrics.acoustic_seconds:
            self.acoustic.observe(seconds)
        if metrics.first_block_seconds is not None:
            self.first_block.observe(metrics.first_block_seconds)
        if metrics.first_text is not None and first_sent is not None:
            self.first_frame_sent.observe(first_sent - metrics.first_text)
        self.cache_hits.inc(metrics.cache_hits)
        self.cache_misses.inc(metrics.cache_misses)

    def render(self) -> bytes:
        return generate_latest(self.registry)
