"""The LLM plug-ins: the echo responder, and OpenAIChatModel with the real `openai` client
against a local server that speaks OpenAI's streaming wire format (openai_chat_double)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from openai_chat_double import ChatDouble, ChatScript, Pause, chat_double
from server_harness import free_port
from voxflow.agent.llm import EchoResponder, LanguageModelError, LanguageModelTimeout, Message
from voxflow.agent.llm_openai import OpenAIChatModel
from voxflow.config import AgentConfig

CONVERSATION = [
    Message("system", "You are terse."),
    Message("user", "Hi there"),
    Message("assistant", "Hello."),
    Message("user", "What time is it?"),
]


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def double() -> Iterator[ChatDouble]:
    with chat_double() as running:
        yield running


@pytest.fixture
async def make_model() -> AsyncIterator:
    made: list[OpenAIChatModel] = []

    def make(base_url: str, **options) -> OpenAIChatModel:
        model = OpenAIChatModel(**{"model": "gpt-test", "base_url": base_url, "api_key": "sk-test", "timeout": 5.0, **options})
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


async def collect(model, messages=CONVERSATION) -> list[str]:
    return [piece async for piece in model.stream(messages)]


# -- the echo responder --


async def test_echo_repeats_the_last_user_message_word_by_word() -> None:
    pieces = await collect(EchoResponder())
    assert pieces == ["What ", "time ", "is ", "it?"]


async def test_echo_keeps_the_spacing_of_what_was_said() -> None:
    pieces = await collect(EchoResponder(), [Message("user", "one  two\tthree ")])
    assert pieces == ["one  ", "two\t", "three "]
    assert "".join(pieces) == "one  two\tthree "


async def test_echo_says_nothing_without_a_user_message() -> None:
    assert await collect(EchoResponder(), [Message("system", "Be nice."), Message("assistant", "Hello.")]) == []
    assert await collect(EchoResponder(), []) == []


# -- OpenAIChatModel: replies --


async def test_pieces_arrive_in_order_and_as_they_are_sent(double: ChatDouble, make_model) -> None:
    double.script = ChatScript(["Hello", " there", Pause(0.3), " friend", "."])
    received: list[tuple[str, float]] = []
    async for piece in make_model(double.base_url).stream(CONVERSATION):
        received.append((piece, time.monotonic()))

    assert [piece for piece, _ in received] == ["Hello", " there", " friend", "."]
    sent_at = double.requests[0].sent_at
    # " there" was in the consumer's hands before the server had even written " friend":
    # the reply is streamed, not collected and then handed over.
    assert received[1][1] < sent_at[2]


async def test_the_request_carries_the_model_the_conversation_and_the_configured_key(
    double: ChatDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    config = AgentConfig(llm="openai", llm_base_url=double.base_url, llm_model="gpt-voice", llm_api_key="sk-from-config")
    model = OpenAIChatModel.from_config(config)
    try:
        assert "".join(await collect(model)) == "Hello there!"
    finally:
        await model.aclose()

    [request] = double.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.body["model"] == "gpt-voice"
    assert request.body["stream"] is True
    assert request.body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What time is it?"},
    ]
    assert request.headers["authorization"] == "Bearer sk-from-config"


async def test_the_key_comes_from_openai_api_key_when_the_config_has_none(
    double: ChatDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    model = OpenAIChatModel.from_config(AgentConfig(llm="openai", llm_base_url=double.base_url))
    try:
        await collect(model)
    finally:
        await model.aclose()
    assert double.requests[0].headers["authorization"] == "Bearer sk-from-env"


async def test_a_local_server_needs_no_key(double: ChatDouble) -> None:
    model = OpenAIChatModel.from_config(AgentConfig(llm="openai", llm_base_url=double.base_url))
    try:
        assert "".join(await collect(model)) == "Hello there!"
    finally:
        await model.aclose()
    assert double.requests[0].headers["authorization"] == "Bearer not-needed"


def test_the_openai_api_without_a_key_is_not_configured() -> None:
    with pytest.raises(LanguageModelError) as caught:
        OpenAIChatModel.from_config(AgentConfig(llm="openai"))
    assert caught.value.code == "llm_not_configured"
    assert "OPENAI_API_KEY" in str(caught.value)


async def test_one_connection_serves_reply_after_reply(double: ChatDouble, make_model) -> None:
    model = make_model(double.base_url)
    assert await collect(model) == ["Hello", " there", "!"]
    assert await collect(model) == ["Hello", " there", "!"]
    first, second = double.requests
    assert first.peer == second.peer
    assert not first.client_went_away.is_set()


async def test_a_finished_reply_ends_even_when_done_never_comes(double: ChatDouble, make_model) -> None:
    double.script = ChatScript(["All", " said."], done=False)
    started = time.monotonic()
    assert await collect(make_model(double.base_url, timeout=0.5)) == ["All", " said."]
    assert time.monotonic() - started < 10
    assert await double.wait_client_went_away()


# -- OpenAIChatModel: the consumer leaves --


async def test_a_consumer_that_stops_early_closes_the_stream(double: ChatDouble, make_model) -> None:
    double.script = ChatScript(["Hello", Pause(30), " there"])
    async with contextlib.aclosing(make_model(double.base_url).stream(CONVERSATION)) as pieces:
        async for piece in pieces:
            assert piece == "Hello"
            break
    assert await double.wait_client_went_away()


async def test_cancelling_the_consumer_closes_the_stream(double: ChatDouble, make_model) -> None:
    double.script = ChatScript(["Hello", " there"], stall_after=1)
    got_a_piece = asyncio.Event()

    async def consume() -> None:
        async for _ in make_model(double.base_url, timeout=60).stream(CONVERSATION):
            got_a_piece.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_a_piece.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await double.wait_client_went_away()


# -- OpenAIChatModel: failures --


async def test_an_error_mid_stream_comes_after_the_pieces_before_it(double: ChatDouble, make_model) -> None:
    double.script = ChatScript(["One", " two", " three"], error_after=2, error_message="The model is overloaded.")
    pieces: list[str] = []
    with pytest.raises(LanguageModelError) as caught:
        async for piece in make_model(double.base_url).stream(CONVERSATION):
            pieces.append(piece)
    assert pieces == ["One", " two"]
    assert not isinstance(caught.value, LanguageModelTimeout)
    assert caught.value.code == "llm_error"
    assert "The model is overloaded." in str(caught.value)


@pytest.mark.parametrize("stall_after", [0, 1])
async def test_a_stalled_stream_times_out_and_is_closed(double: ChatDouble, make_model, stall_after: int) -> None:
    double.script = ChatScript(["Hello", " there"], stall_after=stall_after)
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises(LanguageModelTimeout) as caught:
        async for piece in make_model(double.base_url, timeout=0.5).stream(CONVERSATION):
            pieces.append(piece)
    assert time.monotonic() - started < 10
    assert pieces == ["Hello"][:stall_after]
    assert caught.value.code == "llm_timeout"
    assert await double.wait_client_went_away()


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "Incorrect API key provided: sk-test."), (500, "The server had an error while processing your request.")],
)
async def test_an_http_error_carries_its_status(double: ChatDouble, make_model, status: int, message: str) -> None:
    double.script = ChatScript(status=status, error_message=message)
    with pytest.raises(LanguageModelError) as caught:
        await collect(make_model(double.base_url))
    assert caught.value.code == "llm_error"
    assert f"HTTP {status}" in str(caught.value)
    assert message in str(caught.value)
    assert len(double.requests) == 1  # not retried


async def test_an_unreachable_server_is_an_error(make_model) -> None:
    started = time.monotonic()
    with pytest.raises(LanguageModelError) as caught:
        await collect(make_model(f"http://127.0.0.1:{free_port()}/v1"))
    assert not isinstance(caught.value, LanguageModelTimeout)
    assert "the connection to the LLM server" in str(caught.value)
    assert time.monotonic() - started < 4  # refused at once, not retried or waited out
