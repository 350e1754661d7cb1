"""Turn detection: VAD frames in, the person's turns (start, audio, end) out.

A pure state machine (no I/O, no event loop): the agent's turn node wraps it and supplies the
clock. Frames come from vad.VoiceActivity. Every rule counts whole VAD frames, so none depends
on float sums.

The hang-over. webrtcvad keeps saying "speech" for a while after a sound stops (60 ms after a
short sound at aggressiveness 2 and 3, vad.hangover_ms), so a 100 ms cough comes out as 180
to 210 ms of voiced 30 ms frames. Those frames are no evidence of speech, so the rule below
asks for speech_start_ms plus that hang-over (TurnOptions.vad_hangover_ms) of voiced frames.

What counts as speech. webrtcvad also marks a few frames inside words as non-speech (stops,
unvoiced consonants, short dips), so "N consecutive voiced frames" would restart its count at
every dropout and start turns late, or never for choppy speech. A voiced frame counts as
speech instead when the voiced frames in a sliding window add up to speech_start_ms + the
hang-over. The window is 100 ms longer than that, so speech may drop 100 ms of frames on the
way, and no longer, so that separate clicks do not add up. A single sound shorter than
speech_start_ms less a frame or two never counts (with the defaults 150 ms never does, 200 ms
does; a sound that straddles frame edges or outlasts six frames gets more voiced frames).

Start. A turn starts on the first frame that counts as speech: speech_start_ms + hang-over
after the speech began (~270 ms with the defaults, more where the VAD drops frames).
speech_start is the start of the window's first voiced frame, and the first UserAudio
carries preroll_ms of audio before it.

End, with hysteresis: a turn needs sustained speech to start and sustained non-speech to end,
and in between only what counts as speech moves speech_end. The turn ends once there are
turn_end_ms from speech_end to the next voiced frame: the first voiced frame after speech_end
that is still in the window, or the current frame when there is none. So a word resumed after
a pause is not cut off while the window confirms it, and stray voiced frames or a knock in
the silence put the decision off by at most the window (~390 ms) without ever moving
speech_end. Under the naive rule, "turn_end_ms of consecutive non-speech", one stray frame
every half second would keep a turn alive forever. A turn also ends, forced, when it has
lasted max_turn_seconds from speech_start.

speech_end is the end of the last frame that counted as speech, hang-over included, so it
lies up to ~90 ms past the last sound, and the end is decided turn_end_ms after it.

Each frame goes to at most one turn: the pre-roll buffer is emptied when a turn starts and
the window when one ends, so a forced end followed by more talk starts a fresh turn (once
the start rule holds again) without repeating the end of the previous one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from itertools import islice

from ..config import AgentConfig
from ..errors import InvalidRequest
from .frames import UserAudio, UserStartedSpeaking, UserStoppedSpeaking, VoiceFrame
from .vad import hangover_ms

WINDOW_SLACK_MS = 100  # the dropouts the start window tolerates


@dataclass(frozen=True)
class TurnOptions:
    speech_start_ms: int = 200
    turn_end_ms: int = 600
    preroll_ms: int = 300
    max_turn_seconds: float = 30.0
    vad_hangover_ms: int = hangover_ms(2)  # from_config takes it from vad_aggressiveness

    def __post_init__(self) -> None:
        for name in ("speech_start_ms", "turn_end_ms", "preroll_ms", "max_turn_seconds", "vad_hangover_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InvalidRequest(f"{name} must be a number, got {value!r}")
            if value < 0 or (value == 0 and name != "vad_hangover_ms"):
                raise InvalidRequest(f"{name} must be positive, got {value!r}")
        if self.max_turn_seconds * 1000 <= self.speech_start_ms:
            raise InvalidRequest(
                f"max_turn_seconds ({self.max_turn_seconds}) must be longer than speech_start_ms ({self.speech_start_ms} ms)"
            )

    @classmethod
    def from_config(cls, config: AgentConfig) -> TurnOptions:
        return cls(
            speech_start_ms=config.speech_start_ms,
            turn_end_ms=config.turn_end_ms,
            preroll_ms=config.preroll_ms,
            max_turn_seconds=config.max_turn_seconds,
            vad_hangover_ms=hangover_ms(config.vad_aggressiveness),
        )


TurnFrame = UserStartedSpeaking | UserAudio | UserStoppedSpeaking


def _frames(ms: float, frame_ms: float) -> int:
    """Whole frames covering at least `ms`; the epsilon absorbs float error in frame_ms (a
    duration * 1000 of 29.999999999999996 must still make 600 ms 20 frames, not 21)."""
    return max(1, math.ceil(ms / frame_ms - 1e-9))


class TurnTracker:
    """Decides where the person's turns are; the module docstring has the rules.

    Every frame must last as long as the first. Memory is bounded whatever the input's
    length: a ring of preroll_ms + the start window of frames, and the window's voiced flags.
    """

    def __init__(self, options: TurnOptions | None = None) -> None:
        self.options = options or TurnOptions()
        self._frame_duration: float | None = None
        self._turn = 0
        self._in_turn = False

    @property
    def in_turn(self) -> bool:
        return self._in_turn

    @property
    def turn(self) -> int:
        """The current turn's number, or the last one's outside a turn (0: none yet)."""
        return self._turn

    def _configure(self, duration: float) -> None:
        if self._frame_duration is not None:
            raise InvalidRequest(f"VAD frames must all last {self._frame_duration} s, got one of {duration} s")
        opts = self.options
        frame_ms = duration * 1000
        self._frame_duration = duration
        self._start_frames = _frames(opts.speech_start_ms + opts.vad_hangover_ms, frame_ms)
        self._window_size = self._start_frames + _frames(WINDOW_SLACK_MS, frame_ms)
        self._end_frames = _frames(opts.turn_end_ms, frame_ms)
        self._max_frames = _frames(opts.max_turn_seconds * 1000, frame_ms)
        self._preroll_frames = _frames(opts.preroll_ms, frame_ms)
        # Frames outside a turn. Emptied when a turn starts, while the window is emptied when it
        # ends, so the ring always holds at least the window's frames.
        self._ring: deque[VoiceFrame] = deque(maxlen=self._preroll_frames + self._window_size)
        self._window: deque[bool] = deque(maxlen=self._window_size)
        self._voiced = 0  # voiced frames in _window
        self._frames_in_turn = 0  # since speech_start
        self._since_speech = 0  # frames since the last one that counted as speech
        self._speech_end = 0.0

    def process(self, frame: VoiceFrame, now: float) -> list[TurnFrame]:
        """What this frame decides; `now` (the agent's clock) becomes the decisions' decided_at."""
        if frame.duration != self._frame_duration:
            self._configure(frame.duration)
        window = self._window
        if len(window) == self._window_size:
            self._voiced -= window[0]
        window.append(frame.speech)
        self._voiced += frame.speech
        if self._in_turn:
            return self._continue(frame, now)
        self._ring.append(frame)
        if frame.speech and self._voiced >= self._start_frames:
            return self._start(frame, now)
        return []

    def _start(self, frame: VoiceFrame, now: float) -> list[TurnFrame]:
        ring = self._ring
        back = len(self._window) - self._window.index(True)  # frames from the first voiced one on
        first = len(ring) - back
        pcm = b"".join(f.pcm for f in islice(ring, max(0, first - self._preroll_frames), None))
        speech_start = ring[first].start
        ring.clear()
        self._turn += 1
        self._in_turn = True
        self._frames_in_turn = back
        self._since_speech = 0
        self._speech_end = frame.end
        return [UserStartedSpeaking(self._turn, speech_start, now), UserAudio(self._turn, pcm)]

    def _continue(self, frame: VoiceFrame, now: float) -> list[TurnFrame]:
        out: list[TurnFrame] = [UserAudio(self._turn, frame.pcm)]
        self._frames_in_turn += 1
        if frame.speech and self._voiced >= self._start_frames:
            self._since_speech = 0
            self._speech_end = frame.end
        else:
            self._since_speech += 1
        forced = self._frames_in_turn >= self._max_frames
        if forced or (self._since_speech >= self._end_frames and self._silence() >= self._end_frames):
            out.append(UserStoppedSpeaking(self._turn, self._speech_end, now, forced))
            self._in_turn = False
            self._window.clear()
            self._voiced = 0
        return out

    def _silence(self) -> int:
        """Frames from speech_end to the first voiced frame after it still in the window, or to now."""
        window = self._window
        recent = min(self._since_speech, len(window))  # the window's frames after speech_end
        for offset, voiced in enumerate(islice(window, len(window) - recent, None)):
            if voiced:
                return self._since_speech - recent + offset
        return self._since_speech
