"""The conversation as the LLM sees it (voxflow/agent/conversation.py) and the per-turn latency
marks (voxflow/agent/turn_metrics.py): plain objects, no event loop."""

from __future__ import annotations

import pytest

from voxflow.agent.conversation import Conversation
from voxflow.agent.events import TurnMetrics
from voxflow.agent.llm import Message
from voxflow.agent.turn_metrics import KEPT_TURNS, TurnTimer

SYSTEM = "Be brief."


def roles(conversation: Conversation) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in conversation.messages()]


# -- Conversation --


def test_system_prompt_comes_first() -> None:
    conversation = Conversation(SYSTEM, 10)
    assert conversation.messages() == [Message("system", SYSTEM)]
    conversation.add_user("hello")
    assert roles(conversation) == [("system", SYSTEM), ("user", "hello")]
    assert Conversation("", 10).messages() == []  # no prompt, no empty system message


def test_history_is_bounded_and_the_oldest_go_first() -> None:
    conversation = Conversation(SYSTEM, 4)
    for n in range(30):
        conversation.add_user(f"user {n}")
        conversation.begin_reply(n)
        conversation.reply_written(n, f"bot {n}")
        conversation.reply_heard(n)
    messages = roles(conversation)
    assert messages[0] == ("system", SYSTEM)  # never pushed out
    assert messages[1:] == [("user", "user 28"), ("assistant", "bot 28"), ("user", "user 29"), ("assistant", "bot 29")]


def test_a_reply_enters_the_history_only_once_heard() -> None:
    conversation = Conversation(SYSTEM, 10)
    conversation.add_user("turn on the lights")
    conversation.begin_reply(1)
    assert conversation.active_reply == 1
    conversation.reply_written(1, "The lights are on.")
    assert roles(conversation) == [("system", SYSTEM), ("user", "turn on the lights")]  # written, not yet heard
    assert conversation.active_reply == 1  # still playing
    conversation.reply_heard(1)
    assert roles(conversation)[-1] == ("assistant", "The lights are on.")
    assert conversation.active_reply is None
    conversation.reply_heard(1)  # a second end of the same reply adds nothing
    assert len(conversation.messages()) == 3


def test_a_cut_reply_keeps_only_the_spoken_part() -> None:
    conversation = Conversation(SYSTEM, 10)
    conversation.add_user("tell me the weather")
    conversation.begin_reply(1)
    conversation.reply_written(1, "It will be sunny in the morning with clouds later.")
    conversation.reply_cut(1, "It will be sunny")
    assert roles(conversation)[-1] == ("assistant", "It will be sunny")
    assert conversation.active_reply is None
    # Cut while still being written: what was heard is all there is, the rest never arrives.
    conversation.add_user("and tomorrow")
    conversation.begin_reply(2)
    conversation.reply_cut(2, "Tomorrow")
    conversation.reply_written(2, "Tomorrow it rains.")  # too late: the reply is over
    conversation.reply_heard(2)
    assert [c for r, c in roles(conversation) if r == "assistant"] == ["It will be sunny", "Tomorrow"]


def test_an_empty_cut_adds_nothing() -> None:
    conversation = Conversation(SYSTEM, 10)
    conversation.add_user("hello")
    conversation.begin_reply(1)
    conversation.reply_written(1, "Hi there.")
    conversation.reply_cut(1, "")  # cut before a word was heard
    assert roles(conversation) == [("system", SYSTEM), ("user", "hello")]
    assert conversation.active_reply is None
    conversation.begin_reply(2)
    conversation.reply_heard(2)  # a reply that wrote nothing and played to its (silent) end
    assert roles(conversation) == [("system", SYSTEM), ("user", "hello")]


def test_active_reply_follows_the_newest_turn() -> None:
    conversation = Conversation(SYSTEM, 10)
    assert conversation.active_reply is None
    conversation.begin_reply(1)
    conversation.begin_reply(2)  # the person spoke again before reply 1 ended
    assert conversation.active_reply == 2
    conversation.reply_cut(1, "Half")  # ending the older reply leaves the newer one active
    assert conversation.active_reply == 2
    assert roles(conversation)[-1] == ("assistant", "Half")
    conversation.reply_written(2, "Done.")
    conversation.reply_heard(2)
    assert conversation.active_reply is None
    # Text for a reply that was never begun is ignored.
    conversation.reply_written(9, "ghost")
    conversation.reply_heard(9)
    assert "ghost" not in [c for _, c in roles(conversation)]


# -- TurnTimer --


def make_timer() -> tuple[TurnTimer, list]:
    events: list = []
    return TurnTimer(events.append), events


def test_metrics_parts_add_up_to_voice_to_voice() -> None:
    timer, events = make_timer()
    timer.turn_over(1, decided_at=10.0, waited=0.6)  # speech ended at 9.4
    timer.transcribed(1, 10.05)
    timer.first_text(1, 10.3)
    timer.first_text(1, 10.9)  # only the first text counts
    assert events == []
    timer.first_audio(1, 10.52)
    (m,) = events
    assert isinstance(m, TurnMetrics)
    assert (m.turn, m.t) == (1, 10.52)
    assert m.end_of_turn_ms == pytest.approx(600.0)
    assert m.asr_ms == pytest.approx(50.0)
    assert m.llm_first_token_ms == pytest.approx(250.0)
    assert m.tts_first_audio_ms == pytest.approx(220.0)
    assert m.voice_to_voice_ms == pytest.approx(1120.0)
    parts = m.end_of_turn_ms + m.asr_ms + m.llm_first_token_ms + m.tts_first_audio_ms
    assert m.voice_to_voice_ms == pytest.approx(parts, abs=0.2)  # each part is rounded to 0.1 ms
    timer.first_audio(1, 11.0)  # a turn is measured once
    assert len(events) == 1


def test_no_reply_gives_none_parts() -> None:
    timer, events = make_timer()
    timer.turn_over(1, decided_at=5.0, waited=0.7)
    timer.transcribed(1, 5.1)
    timer.no_reply(1, 5.2)  # nothing recognised, or the LLM failed
    (m,) = events
    assert (m.turn, m.t) == (1, 5.2)
    assert m.end_of_turn_ms == pytest.approx(700.0)
    assert m.asr_ms == pytest.approx(100.0)
    assert m.llm_first_token_ms is None and m.tts_first_audio_ms is None and m.voice_to_voice_ms is None
    # Cut before it was even transcribed: only the end of turn is known.
    timer.turn_over(2, decided_at=6.0, waited=0.6)
    timer.no_reply(2, 6.1)
    assert events[1].asr_ms is None and events[1].end_of_turn_ms == pytest.approx(600.0)
    # A turn the timer never saw (or already reported) reports nothing.
    timer.no_reply(7, 7.0)
    timer.first_audio(2, 7.0)
    assert len(events) == 2


def test_old_turns_are_pruned() -> None:
    timer, events = make_timer()
    for turn in range(1, KEPT_TURNS + 3):  # two more than are kept
        timer.turn_over(turn, decided_at=float(turn), waited=0.6)
    for turn in range(1, KEPT_TURNS + 3):
        timer.transcribed(turn, turn + 0.1)
        timer.first_audio(turn, turn + 0.5)
    assert [m.turn for m in events] == list(range(3, KEPT_TURNS + 3))  # turns 1 and 2 were dropped
