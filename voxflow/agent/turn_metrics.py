"""Per-turn latency: end of the person's speech -> final transcript -> first LLM text -> first
bot audio. Nodes mark the moments as they pass them; the turn's TurnMetrics event goes out
once its reply is heard or the turn ends without one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .events import AgentEvent, TurnMetrics

KEPT_TURNS = 8  # turns whose marks are kept; older ones can no longer be measured


@dataclass
class _Marks:
    speech_end: float  # on the agent's clock: when the last speech was heard
    decided: float
    transcript: float | None = None
    first_text: float | None = None


def _ms(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else round((end - start) * 1000, 1)


class TurnTimer:
    def __init__(self, report: Callable[[AgentEvent], None]) -> None:
        self._report = report
        self._turns: dict[int, _Marks] = {}

    def turn_over(self, turn: int, decided_at: float, waited: float) -> None:
        """waited: the silence (s) the turn detector heard after the last speech."""
        self._turns[turn] = _Marks(decided_at - waited, decided_at)
        for old in sorted(self._turns)[:-KEPT_TURNS]:
            del self._turns[old]

    def transcribed(self, turn: int, t: float) -> None:
        if (marks := self._turns.get(turn)) is not None:
            marks.transcript = t

    def first_text(self, turn: int, t: float) -> None:
        if (marks := self._turns.get(turn)) is not None and marks.first_text is None:
            marks.first_text = t

    def first_audio(self, turn: int, t: float) -> None:
        self._finish(turn, t)

    def no_reply(self, turn: int, t: float) -> None:
        """The turn ended without bot audio (nothing recognised, cut, failed)."""
        self._finish(turn, None, t)

    def _finish(self, turn: int, audio: float | None, t: float | None = None) -> None:
        marks = self._turns.pop(turn, None)
        if marks is None:
            return
        self._report(TurnMetrics(
            audio if t is None else t,
            turn,
            end_of_turn_ms=_ms(marks.speech_end, marks.decided),
            asr_ms=_ms(marks.decided, marks.transcript),
            llm_first_token_ms=_ms(marks.transcript, marks.first_text),
            tts_first_audio_ms=_ms(marks.first_text, audio),
            voice_to_voice_ms=_ms(marks.speech_end, audio),
        ))
