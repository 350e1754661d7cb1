"""The conversation as the LLM sees it: the system prompt, then the person's turns and the
bot's replies, each reply as much of it as was actually heard."""

from __future__ import annotations

import collections

from .llm import Message


class Conversation:
    def __init__(self, system_prompt: str, max_messages: int) -> None:
        self.system_prompt = system_prompt
        self._history: collections.deque[Message] = collections.deque(maxlen=max_messages)
        self.active_reply: int | None = None  # the turn whose reply is being written or spoken
        self._written: dict[int, str] = {}

    def messages(self) -> list[Message]:
        system = [Message("system", self.system_prompt)] if self.system_prompt else []
        return system + list(self._history)

    def add_user(self, text: str) -> None:
        self._history.append(Message("user", text))

    def begin_reply(self, turn: int) -> None:
        self.active_reply = turn
        self._written[turn] = ""

    def reply_written(self, turn: int, text: str) -> None:
        """The LLM is done; the text enters the history once it has been heard."""
        if turn in self._written:
            self._written[turn] = text

    def reply_heard(self, turn: int) -> None:
        self._end(turn, self._written.get(turn, ""))

    def reply_cut(self, turn: int, spoken: str) -> None:
        """A barge-in: only what the person heard before it was said."""
        self._end(turn, spoken)

    def _end(self, turn: int, text: str) -> None:
        if self._written.pop(turn, None) is not None and text:
            self._history.append(Message("assistant", text))
        if self.active_reply == turn:
            self.active_reply = None
