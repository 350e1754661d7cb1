"""Prometheus metrics: an observer fed by the transports as streams end and conversations report, never in the data path."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ...agent.events import AgentError, AgentEvent, Interrupted, TurnMetrics
from ...streaming.stream import StreamMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
# A conversation's turn takes longer: voice-to-voice includes the silence that ends the turn.
_TURN_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)


def _event_loop_tasks() -> float:
    # Read at scrape time, on the server's loop (the /metrics endpoint runs there).
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # rendered with no loop running: nothing to count
        return float("nan")


class ServerMetrics:
    """One registry per server, so several servers (tests) do not share counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Resident memory, open descriptors and live tasks: what a leak shows in first.
        ProcessCollector(registry=r)
        Gauge("voxflow_event_loop_tasks", "Tasks alive on the event loop serving /metrics", registry=r).set_function(
            _event_loop_tasks
        )
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
        self.agent_conversations = Gauge("voxflow_agent_conversations", "Conversations with the agent in progress", registry=r)
        self.agent_turns = Counter("voxflow_agent_turns", "The person's turns that ended (answered or not)", registry=r)
        self.agent_interruptions = Counter("voxflow_agent_interruptions", "Replies the person spoke over", registry=r)
        self.agent_barge_in_stop = Histogram(
            "voxflow_agent_barge_in_stop_seconds", "Barge-in decided to the end of the audio already handed out",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # One histogram per TurnMetrics field, in milliseconds there and seconds here.
        self._turn_parts = {
            field: Histogram(f"voxflow_agent_{name}_seconds", help_text, buckets=_TURN_BUCKETS, registry=r)
            for field, name, help_text in (
                ("voice_to_voice_ms", "voice_to_voice", "End of the person's speech to the reply's first audio"),
                ("asr_ms", "asr", "Turn over to final transcript"),
                ("llm_first_token_ms", "llm_first_token", "Transcript to the LLM's first text"),
                ("tts_first_audio_ms", "tts_first_audio", "The LLM's first text to the reply's first audio"),
            )
        }

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

    def agent_event(self, event: AgentEvent) -> None:
        """Record what one conversation event tells (called as it goes out to the client)."""
        if isinstance(event, TurnMetrics):
            self.agent_turns.inc()
            for field, histogram in self._turn_parts.items():
                if (ms := getattr(event, field)) is not None:
                    histogram.observe(ms / 1000)
        elif isinstance(event, Interrupted):
            self.agent_interruptions.inc()
            self.agent_barge_in_stop.observe(event.stop_ms / 1000)
        elif isinstance(event, AgentError):
            self.errors.labels(event.code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
