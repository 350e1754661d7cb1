"""A smart speaker on MQTT: ask voxflow to say something and play the audio as it arrives.

    .venv/bin/voxflow mqtt --broker mqtt://127.0.0.1:1883      # in another terminal
    .venv/bin/python demos/smart_speaker.py --device kitchen --text "Dinner is ready." -o said.wav

There is no sound card here, so "playing" means appending each audio message to a WAV file the
moment it arrives, just where a real speaker would hand it to its audio output. Prints the time
from the request to the first audio message and to `done` (docs/mqtt.md has the topics).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import time
import wave

import aiomqtt

from voxflow.transports.protocols.mqtt_protocol import BrokerAddress, unpack_audio


async def speak(broker_url: str, device: str, text: str, output: str, prefix: str = "voxflow") -> None:
    broker = BrokerAddress.parse(broker_url)
    request_id = secrets.token_hex(4)
    async with aiomqtt.Client(broker.host, broker.port, username=broker.username, password=broker.password,
                              protocol=aiomqtt.ProtocolVersion.V5,
                              socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]) as client:
        # Subscribed before asking, so not even the first audio message can be missed.
        for topic in ("event", "error", f"audio/{request_id}"):
            await client.subscribe(f"{prefix}/{device}/{topic}", qos=1)
        t0 = time.perf_counter()
        await client.publish(f"{prefix}/{device}/say", json.dumps({"text": text, "id": request_id}), qos=1)
        speaker: wave.Wave_write | None = None
        try:
            async with asyncio.timeout(60):
                async for message in client.messages:
                    payload = bytes(message.payload)
                    if "/audio/" in message.topic.value:
                        audio = unpack_audio(payload)
                        if audio.format is not None:
                            print(f"first audio after {(time.perf_counter() - t0) * 1000:.0f} ms")
                            speaker = wave.open(output, "wb")
                            speaker.setnchannels(audio.format.channels)
                            speaker.setsampwidth(2)
                            speaker.setframerate(audio.format.sample_rate)
                        if speaker is not None:  # audio at QoS 0 may lose the first message
                            speaker.writeframes(audio.pcm)
                        continue
                    event = json.loads(payload)
                    if event.get("id") != request_id:  # another request for this device
                        continue
                    if event["type"] == "error":
                        raise SystemExit(f"error {event['code']}: {event['message']}")
                    if event["type"] == "done":
                        print(f"done after {(time.perf_counter() - t0) * 1000:.0f} ms: "
                              f"{event['audio_seconds']:.2f} s of audio in {output}")
                        return
        finally:
            if speaker is not None:
                speaker.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--device", default="kitchen", help="this speaker's topic level")
    parser.add_argument("--text", default="Good morning! It is seven o'clock and the coffee is ready.")
    parser.add_argument("-o", "--output", default="smart_speaker.wav", help="WAV file the audio is played into")
    args = parser.parse_args()
    asyncio.run(speak(args.broker, args.device, args.text, args.output))


if __name__ == "__main__":
    main()
