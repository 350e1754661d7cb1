"""Language-model plug-ins: the interface the agent's LLM node calls, and the echo responder
that lets the whole loop run offline."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from ..config import AgentConfig
from ..errors import InvalidRequest, VoxflowError


class LanguageModelError(VoxflowError):
    code = "llm_error"


class LanguageModelTimeout(LanguageModelError):
    code = "llm_timeout"


@dataclass(frozen=True, slots=True)
class Message:
    role: Literal["system", "user", "assistant"]
    content: str


class LanguageModel(ABC):
    @abstractmethod
    def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        """The reply to the conversation so far, piece by piece as it is written.

        Raises LanguageModelError (or LanguageModelTimeout) when the model fails or stalls,
        possibly after some pieces were already yielded.
        """

    async def aclose(self) -> None:
        """Release what the model holds (HTTP clients)."""


class EchoResponder(LanguageModel):
    """Repeats the person's last words, a word at a time, as a model would stream them."""

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        for piece in re.findall(r"\S+\s*", last):
            yield piece


def language_model_from_config(config: AgentConfig) -> LanguageModel:
    if config.llm == "echo":
        return EchoResponder()
    if config.llm == "openai":
        from .llm_openai import OpenAIChatModel  # the openai client is imported only when used

        return OpenAIChatModel.from_config(config)
    raise InvalidRequest(f"unknown llm {config.llm!r}; known: echo, openai")
