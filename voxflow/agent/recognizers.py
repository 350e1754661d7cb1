"""The recognizer the configuration names."""

from __future__ import annotations

from ..config import AgentConfig
from ..errors import InvalidRequest
from .asr import SpeechRecognizer


def recognizer_from_config(config: AgentConfig) -> SpeechRecognizer:
    # Imported on demand: pocketsphinx loads native code a remote-ASR setup never needs.
    if config.asr == "pocketsphinx":
        from .asr_pocketsphinx import PocketsphinxRecognizer

        return PocketsphinxRecognizer()
    if config.asr == "openai":
        from .asr_openai import OpenAITranscriber

        return OpenAITranscriber.from_config(config)
    raise InvalidRequest(f"unknown asr {config.asr!r}: use 'pocketsphinx' or 'openai'")
