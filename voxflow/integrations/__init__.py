"""Framework plugins that speak voxflow's own protocol (docs/compatibility.md, "Native plugins").

- `voxflow.integrations.pipecat.VoxflowTTSService`, a Pipecat TTS service (`pip install voxflow[pipecat]`).
- `voxflow.integrations.livekit.TTS`, a LiveKit Agents TTS plugin (`pip install voxflow[livekit]`).

Both build on the client SDK (voxflow.client): one WebSocket per plugin instance, one voxflow
context per utterance, the server's word events as the framework's timed words, and `cancel`
when the framework drops an utterance (barge-in). This package imports neither framework;
each module imports its own and names its extra when it is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..client import AsyncVoxflowClient, Context, StyleSpec
from ..transports.protocols.native_protocol import Start

__all__ = ["SpeechOptions"]


@dataclass(frozen=True)
class SpeechOptions:
    """What a plugin asks for in every context it opens; checked when built.

    voice: a voice (or alias) on the server, None for its default. style: a preset name
    (`neutral`, `happy`, `sad`, `serious`, `calm`) or a StyleSpec. speed: 0.5-2.0, replacing
    the style's own. sample_rate: one of the protocol's rates. seed: the synthesis noise seed,
    None for the server's. A bad value raises ProtocolError (code `invalid_request`) here
    rather than as an error event on the first utterance.
    """

    voice: str | None = None
    style: str | StyleSpec | None = None
    speed: float | None = None
    sample_rate: int = 24000
    seed: int | None = None

    def __post_init__(self) -> None:
        # The server parses a context's start with these same checks.
        Start(
            context="options", voice=self.voice, style=self._style(), sample_rate=self.sample_rate, seed=self.seed
        ).resolved_style()

    def context(self, client: AsyncVoxflowClient, context_id: str | None = None) -> Context:
        """A context with these options on the client's connection (not started yet)."""
        return client.context(
            voice=self.voice, style=self._style(), sample_rate=self.sample_rate, seed=self.seed, context_id=context_id
        )

    def _style(self) -> str | StyleSpec | None:
        if self.speed is None:
            return self.style
        spec = StyleSpec(preset=self.style) if isinstance(self.style, str) else self.style or StyleSpec()
        return replace(spec, speed=self.speed)


def missing_extra(extra: str, error: ImportError) -> ImportError:
    """The error a plugin module raises when its framework is not installed."""
    return ImportError(
        f"voxflow.integrations.{extra} needs {error.name or 'its framework'}, "
        f"which is not installed: pip install 'voxflow[{extra}]'"
    )
