"""Speak an LLM-like reply through LiveKit Agents' TTS interface with voxflow's native plugin.

    .venv/bin/voxflow serve                      # in another terminal
    .venv/bin/python demos/livekit_native.py [--server ws://127.0.0.1:8765/v1/stream] [-o livekit.wav]

The reply is pushed token by token into `TTS.stream()`, as an AgentSession's TTS node does
with its LLM's output; no LiveKit room or server is involved. Each word is printed with its
time in the audio (the aligned transcript LiveKit's synchronizer uses for subtitles), and the
audio goes to a WAV file. Needs `pip install voxflow[livekit]`.
"""

from __future__ import annotations

import argparse
import asyncio

from livekit import rtc
from livekit.agents.types import USERDATA_TIMED_TRANSCRIPT

from voxflow.integrations import livekit as voxflow
from voxflow.streaming.tokens import gpt_like_tokens, paced

REPLY = "Sure! The museum opens at ten, so we have time for breakfast and a short walk by the river."


async def main(server: str, output: str) -> None:
    tts = voxflow.TTS(url=server, style="calm")
    frames: list[rtc.AudioFrame] = []
    async with tts.stream() as stream:

        async def reply() -> None:
            async for token in paced(gpt_like_tokens(REPLY), 50):
                stream.push_text(token)
            stream.end_input()

        feeding = asyncio.create_task(reply())
        async for audio in stream:
            for word in audio.frame.userdata.get(USERDATA_TIMED_TRANSCRIPT, []):
                print(f"  {word.start_time:6.2f}-{word.end_time:6.2f} s  {word.strip()}")
            frames.append(audio.frame)
        await feeding
    await tts.aclose()

    speech = rtc.combine_audio_frames(frames)
    with open(output, "wb") as wav:
        wav.write(speech.to_wav_bytes())
    print(f"wrote {speech.duration:.1f} s of audio to {output}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="ws://127.0.0.1:8765/v1/stream")
    parser.add_argument("-o", "--output", default="livekit.wav")
    args = parser.parse_args()
    asyncio.run(main(args.server, args.output))
