"""The LLM plug-in for OpenAI-compatible servers: streaming chat completions from OpenAI itself
or from a local server (vLLM, llama.cpp, Ollama) at a base URL."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence

import openai

from ..config import AgentConfig
from .llm import LanguageModel, LanguageModelError, LanguageModelTimeout, Message


class OpenAIChatModel(LanguageModel):
    def __init__(
        self,
        *,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        base_url = base_url or None
        api_key = api_key or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if base_url is None:
                raise LanguageModelError(
                    "the OpenAI LLM needs an API key: set llm_api_key (VOXFLOW_LLM_API_KEY) or "
                    "OPENAI_API_KEY, or llm_base_url (VOXFLOW_LLM_BASE_URL) for a local server that needs none",
                    code="llm_not_configured",
                )
            # Local servers accept any key, but the SDK will not send a request without one.
            api_key = "not-needed"
        self.model = model
        self.timeout = timeout
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            # The SDK would retry a failed request after a backoff of seconds, while the person
            # waits in silence for an answer; failing at once lets the agent say so instead.
            max_retries=0,
        )

    @classmethod
    def from_config(cls, config: AgentConfig) -> OpenAIChatModel:
        return cls(
            model=config.llm_model,
            base_url=config.llm_base_url,
            api_key=config.llm_api_key,
            timeout=config.llm_timeout_seconds,
        )

    async def stream(self, messages: Sequence[Message]) -> AsyncIterator[str]:
        """A consumer that stops early should close the generator (contextlib.aclosing), which
        releases the HTTP response at once rather than when it is collected."""
        loop = asyncio.get_running_loop()
        # The deadline runs while this waits for the model, not while the consumer holds a piece.
        deadline = loop.time() + self.timeout
        finished = False
        try:
            async with asyncio.timeout_at(deadline):
                chunks = await self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": m.role, "content": m.content} for m in messages],
                    stream=True,
                )
            # Leaving this block, however it is left (the end, an error, the consumer's break or
            # cancellation), closes the response, so a stalled stream does not hold a connection.
            async with chunks:
                while True:
                    try:
                        async with asyncio.timeout_at(deadline):
                            chunk = await anext(chunks, None)
                    except TimeoutError:
                        if finished:
                            # The reply is whole; a server that never sends [DONE] costs only the wait.
                            return
                        raise LanguageModelTimeout(f"the LLM sent nothing for {self.timeout:g} s") from None
                    if chunk is None:
                        return
                    # Some servers send chunks without choices (Azure's prompt filter results,
                    # usage at the end).
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.delta.content and not finished:
                        yield choice.delta.content
                        deadline = loop.time() + self.timeout
                    # Reading on to [DONE] rather than stopping here lets the SDK leave the
                    # connection reusable, which spares the next turn a TLS handshake.
                    finished = finished or choice.finish_reason is not None
        except openai.APITimeoutError:
            raise LanguageModelTimeout(f"the LLM sent nothing for {self.timeout:g} s") from None
        except openai.APIStatusError as exc:
            # exc.body is the "error" object of OpenAI's error body, when the server sent one.
            detail = exc.body.get("message") if isinstance(exc.body, dict) else None
            raise LanguageModelError(f"the LLM server answered HTTP {exc.status_code}" + (f": {detail}" if detail else "")) from exc
        except openai.APIConnectionError as exc:
            raise LanguageModelError(f"the connection to the LLM server at {self._client.base_url} failed: {exc.__cause__ or exc}") from exc
        except openai.APIError as exc:
            # An error event in the stream: the server failed after it had begun the reply.
            kind = f" ({exc.code or exc.type})" if exc.code or exc.type else ""
            raise LanguageModelError(f"the LLM server failed mid-reply{kind}: {exc.message}") from exc
        except ValueError as exc:  # the SDK's JSON decoding of a `data:` line that is not JSON
            raise LanguageModelError(f"the LLM server sent a stream that is not JSON: {exc}") from exc

    async def aclose(self) -> None:
        await self._client.close()
