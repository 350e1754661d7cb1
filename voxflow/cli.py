"""The `voxflow` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator

from .config import PRECISIONS, EngineConfig, load_config
from .errors import InvalidRequest, VoiceFileError, VoxflowError
from .streaming.events import AudioFrame, StreamEnd, WordTimestamp
from .voices.styles import PRESETS, resolve_style

if TYPE_CHECKING:
    from .voices.registry import VoiceRegistry


def _process_age_seconds() -> float:
    """Seconds since this process was created (covers interpreter start and imports)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def _print_figures(figures: dict, as_json: bool, out) -> None:
    """One JSON object for scripts, or aligned `name: value` lines for people."""
    if as_json:
        print(json.dumps(figures), file=out)
        return
    width = max(map(len, figures))
    for key, value in figures.items():
        if value is not None:
            print(f"{key:>{width}}: {value}", file=out)


def _peak_rss_mb() -> float:
    """High-water resident memory of this process image.

    Read from /proc rather than getrusage: ru_maxrss survives exec, so a process started from a
    large parent would report the parent's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--config", help="TOML file with an [engine] table")
    g.add_argument("--voice", help="voice name (see `voxflow voices`)")
    g.add_argument("--voice-dir", action="append", dest="voice_dirs", help="directory of extra Piper voices")
    g.add_argument("--device", help="cpu (default) or cuda")
    g.add_argument("--half", action="store_true", default=None, help="float16 weights (GPU only)")
    g.add_argument("--decoder-precision", choices=PRECISIONS,
                   help="HiFi-GAN precision (default auto: bfloat16 on CPUs with bfloat16 instructions, else float32)")
    g.add_argument("--flow-precision", choices=PRECISIONS,
                   help="precision of the flow's dilated convolutions (default auto, as above)")
    g.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    g.add_argument("--seed", type=int, help="noise seed (default 0)")


def _engine_flags(args: argparse.Namespace) -> dict:
    """The engine settings given as flags (None where a flag was left out)."""
    return {"voice": args.voice, "voice_dirs": args.voice_dirs, "device": args.device, "half": args.half,
            "decoder_precision": args.decoder_precision, "flow_precision": args.flow_precision, "threads": args.threads, "seed": args.seed}


def _config(args: argparse.Namespace) -> EngineConfig:
    return load_config(args.config, **_engine_flags(args))


def _write_wav(path: str, pcm: bytes, rate: int) -> None:
    with wave.open(path, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(pcm)


def _style(args: argparse.Namespace):
    return resolve_style(args.style, speed=args.speed, expressiveness=args.expressiveness, volume=args.volume)


async def _stdin_fragments() -> AsyncIterator[str]:
    """Text from stdin as it arrives (a pipe from an LLM), decoded incrementally as UTF-8."""
    import codecs

    loop = asyncio.get_running_loop()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    fd = sys.stdin.fileno()
    while data := await loop.run_in_executor(None, os.read, fd, 4096):
        if text := decoder.decode(data):
            yield text
    if tail := decoder.decode(b"", final=True):
        yield tail


async def _say_streaming(args: argparse.Namespace, engine, fragments: AsyncIterator[str], to_stdout: bool) -> dict:
    from .streaming.stream import StreamOptions

    stream = engine.open_stream(
        style=_style(args), speaker=args.speaker,
        options=StreamOptions(sample_rate=args.rate, max_text_chars=engine.config.max_text_chars),
    )
    started = time.perf_counter()

    async def feed() -> None:
        async for fragment in fragments:
            await stream.push(fragment)
        await stream.end()

    feeder = asyncio.create_task(feed())
    pcm = bytearray()
    words: list[WordTimestamp] = []
    rate = args.rate or stream.info.sample_rate
    end: StreamEnd | None = None
    try:
        async for event in stream:
            if isinstance(event, AudioFrame):
                rate = event.sample_rate
                if to_stdout:
                    sys.stdout.buffer.write(event.pcm)
                    sys.stdout.buffer.flush()
                else:
                    pcm += event.pcm
            elif isinstance(event, WordTimestamp):
                words.append(event)
            else:
                end = event
        await feeder
    finally:
        feeder.cancel()
        await stream.aclose()
    if end is None or end.reason != "done":
        raise VoxflowError(end.message if end else "stream ended unexpectedly", code=end.code if end else "internal_error")
    m = stream.metrics
    audio_seconds = m.audio_seconds
    if args.output and not to_stdout:
        _write_wav(args.output, bytes(pcm), rate)
    return {
        "mode": "stream",
        "first_audio_ms": round((m.first_audio - m.first_text) * 1000, 1) if m.first_audio and m.first_text else None,
        "chunk_to_first_audio_ms": round((m.first_audio - m.first_chunk) * 1000, 1) if m.first_audio and m.first_chunk else None,
        "process_to_first_audio_s": round(_process_age_seconds() - (time.perf_counter() - m.first_audio), 3) if m.first_audio else None,
        "audio_seconds": round(audio_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "rtf": round(m.compute_seconds / audio_seconds, 4) if audio_seconds else None,
        "chunks": m.chunks,
        "peak_rss_mb": _peak_rss_mb(),
        "words": len(words),
        "sample_rate": rate,
        "output": None if to_stdout else args.output,
    }


def _say_whole(args: argparse.Namespace, engine, text: str) -> dict:
    import numpy as np
    import soxr

    engine.voice()  # load before timing, as the streaming path does
    started = time.perf_counter()
    utt = engine.synthesize(text, style=_style(args), speaker=args.speaker)
    compute = time.perf_counter() - started
    audio, rate = utt.audio, utt.sample_rate
    if args.rate and args.rate != rate:
        audio, rate = soxr.resample(audio, rate, args.rate), args.rate
    pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes()
    if args.output:
        _write_wav(args.output, pcm, rate)
    return {
        "mode": "whole",
        "audio_seconds": round(utt.duration, 3),
        "wall_seconds": round(compute, 3),
        "rtf": round(compute / utt.duration, 4) if utt.duration else None,
        "process_to_audio_s": round(_process_age_seconds(), 3),
        "words": len(utt.words),
        "peak_rss_mb": _peak_rss_mb(),
        "sample_rate": rate,
        "output": args.output,
    }


def cmd_say(args: argparse.Namespace) -> int:
    from .streaming.engine import Engine
    from .streaming.tokens import gpt_like_tokens, paced

    from_stdin = args.text == "-"
    if args.file:
        text = Path(args.file).read_text(encoding="utf-8")
    elif not from_stdin:
        if args.text is None:
            raise VoxflowError("give TEXT, '-' for stdin, or --file", code="invalid_request")
        text = args.text
    if not from_stdin and not args.output:
        raise VoxflowError("-o/--output is required unless reading from stdin", code="invalid_request")

    engine = Engine(_config(args))
    try:
        if from_stdin:
            figures = asyncio.run(_say_streaming(args, engine, _stdin_fragments(), to_stdout=True))
        elif args.stream:
            figures = asyncio.run(_say_streaming(args, engine, paced(gpt_like_tokens(text), args.tps), to_stdout=False))
        else:
            figures = _say_whole(args, engine, text)
    finally:
        engine.close()
    _print_figures(figures, args.json, sys.stderr if from_stdin else sys.stdout)
    return 0


def cmd_voices(args: argparse.Namespace) -> int:
    """List the voices, or add (copy in) or remove one in the configured voice directories."""
    from .voices.registry import VoiceRegistry

    config = _config(args)
    registry = VoiceRegistry(config.voice_dirs, config.device, config.half, config.decoder_precision, config.flow_precision, default=config.voice)
    if args.action != "list" and not args.target:
        raise InvalidRequest(f"voxflow voices {args.action} needs a {'file' if args.action == 'add' else 'voice name'}")
    if args.action == "add":
        model_path = Path(args.target)
        if model_path.suffix != ".onnx":
            raise InvalidRequest(f"{model_path} is not a Piper voice file (NAME.onnx, with NAME.onnx.json beside it)")
        try:
            with open(model_path, "rb") as model, open(model_path.with_name(model_path.name + ".json"), "rb") as config_file:
                info = registry.install(args.name or model_path.stem, model, config_file)
        except OSError as exc:
            raise VoiceFileError(f"cannot read {exc.filename}: {exc.strerror}") from exc
        print(f"added {info.name}: {info.model_path}")
        return 0
    if args.action == "remove":
        info = registry.remove(args.target)
        print(f"removed {info.name}: {info.match.name + ' (matched to ' + info.match.base_voice + ')' if info.match else info.model_path}")
        return 0
    if args.action == "match":
        return _match_voice(args, config, registry)
    rows = [
        {"name": s.info.name, "language": s.info.language, "sample_rate": s.info.sample_rate, "quality": s.info.quality,
         "speakers": s.info.num_speakers, "espeak_voice": s.info.espeak_voice, "source": s.source}
        for s in registry.statuses()
    ]
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"{'name':<28} {'language':<9} {'rate':>6} {'quality':<8} {'speakers':>8}  source")
        for r in rows:
            print(f"{r['name']:<28} {r['language']:<9} {r['sample_rate']:>6} {r['quality']:<8} {r['speakers']:>8}  {r['source']}")
    return 0


def _match_voice(args: argparse.Namespace, config: EngineConfig, registry: VoiceRegistry) -> int:
    from .streaming.engine import Engine
    from .voices.make_match import ConsentInput, make_profile

    if not args.reference:
        raise InvalidRequest("voxflow voices match needs --reference FILE... (at least 60 s of the speaker's speech)")
    registry.check_new_name(args.target)  # before the analysis, not after it
    base = registry.info(args.base)
    if base.match is not None:
        raise InvalidRequest(f"{base.name} is itself a matched voice; match from a Piper voice")
    consent = ConsentInput(Path(args.consent) if args.consent else None, args.attest)
    engine = Engine(config)
    try:
        def speak(text: str) -> tuple[Any, int]:
            utterance = engine.synthesize(text, voice=base.name)
            return utterance.audio, utterance.sample_rate

        profile = make_profile(args.target, base.name, [Path(p) for p in args.reference], consent, speak)
    finally:
        engine.close()
    registry.add_match(profile)
    print(
        f"matched {profile.name} from {base.name}: {profile.reference_seconds:.0f} s of reference speech, "
        f"{profile.encoder} similarity {profile.base_similarity:.2f} -> {profile.similarity:.2f} "
        f"(formant ratio {profile.params.formant_ratio:g}, pitch {profile.params.base_pitch.median_hz:.0f} -> "
        f"{profile.params.target_pitch.median_hz:.0f} Hz), consent {profile.consent.method}"
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .config import load_settings
    from .transports.runner import check_tls, serve

    settings = load_settings(
        args.config,
        engine=_engine_flags(args),
        server={"host": args.host, "port": args.port, "mqtt_url": args.mqtt, "wyoming_url": args.wyoming,
                "ssl_certfile": args.ssl_certfile, "ssl_keyfile": args.ssl_keyfile, "zeroconf": args.zeroconf,
                "zeroconf_name": args.zeroconf_name, "zeroconf_address": args.zeroconf_address},
    )
    check_tls(settings.server)  # before the banner, which would claim a server that cannot start
    http, ws = ("https", "wss") if settings.server.ssl_certfile else ("http", "ws")
    address = f"{settings.server.host}:{settings.server.port}"
    print(f"voxflow serving on {http}://{address} (WebSocket {ws}://{address}/v1/stream, docs /docs)", flush=True)
    serve(settings)
    return 0


def cmd_mqtt(args: argparse.Namespace) -> int:
    import uvloop

    from .config import load_settings
    from .transports.mqtt_bridge import serve_mqtt

    settings = load_settings(
        args.config,
        engine=_engine_flags(args),
        server={"mqtt_url": args.broker, "mqtt_prefix": args.prefix, "mqtt_share_group": args.share_group},
    )
    print(f"voxflow bridging {settings.server.mqtt_url} (topics {settings.server.mqtt_prefix}/..., docs/mqtt.md)", flush=True)
    uvloop.run(serve_mqtt(settings))
    return 0


async def _speak_remote(args: argparse.Namespace) -> dict:
    from urllib.parse import urlsplit

    from .client import AsyncVoxflowClient, Audio, Cancelled, Error, Metrics, Word
    from .streaming.tokens import gpt_like_tokens, paced

    url = args.server if urlsplit(args.server).path.strip("/") else args.server.rstrip("/") + "/v1/stream"
    to_stdout = args.output == "-"
    pcm = bytearray()
    words = 0
    metrics: Metrics | None = None
    first_token: float | None = None
    first_audio: float | None = None
    started = time.perf_counter()
    async with AsyncVoxflowClient(url, args.api_key) as client, client.context(
        voice=args.voice, style=args.style, sample_rate=args.rate
    ) as ctx:

        async def feed() -> None:
            nonlocal first_token
            async for token in paced(gpt_like_tokens(args.text), args.tps):
                first_token = first_token or time.perf_counter()
                ctx.push(token)
            ctx.end()

        feeder = asyncio.create_task(feed())
        try:
            async for event in ctx:
                if isinstance(event, Audio):
                    first_audio = first_audio or time.perf_counter()
                    if to_stdout:
                        sys.stdout.buffer.write(event.pcm)
                        sys.stdout.buffer.flush()
                    else:
                        pcm += event.pcm
                elif isinstance(event, Word):
                    words += 1
                elif isinstance(event, Metrics):
                    metrics = event
                elif isinstance(event, Error):
                    raise VoxflowError(event.message, code=event.code)
                elif isinstance(event, Cancelled):
                    raise VoxflowError("the server cancelled the utterance", code="cancelled")
        finally:
            feeder.cancel()
        rate = ctx.sample_rate or 0
    if not to_stdout:
        _write_wav(args.output, bytes(pcm), rate)
    return {
        "server": url,
        "first_audio_ms": round((first_audio - first_token) * 1000, 1) if first_audio and first_token else None,
        "audio_seconds": round(metrics.audio_seconds, 3) if metrics else None,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "words": words,
        "sample_rate": rate,
        "server_first_audio_ms": round(metrics.first_audio_ms, 1) if metrics and metrics.first_audio_ms is not None else None,
        "server_rtf": round(metrics.rtf, 4) if metrics and metrics.rtf is not None else None,
        "output": None if to_stdout else args.output,
    }


def cmd_speak(args: argparse.Namespace) -> int:
    figures = asyncio.run(_speak_remote(args))
    _print_figures(figures, args.json, sys.stderr if args.output == "-" else sys.stdout)
    return 0


def _print_turns(events: list, out) -> None:
    """One line per turn: what was heard, what was answered, and how long each step took."""
    by_turn: dict[int, dict] = {}
    for event in events:
        if event.type in ("transcript", "reply", "turn_metrics", "interrupted"):
            by_turn.setdefault(event.turn, {})[event.type] = event
    for turn, seen in sorted(by_turn.items()):
        heard = seen["transcript"].text if "transcript" in seen else ""
        replied = seen["reply"].text if "reply" in seen else ""
        print(f"turn {turn}: heard {heard!r} -> replied {replied!r}", file=out)
        if (m := seen.get("turn_metrics")) is not None:
            print(f"  voice-to-voice {m.voice_to_voice_ms} ms = end of turn {m.end_of_turn_ms} + asr {m.asr_ms}"
                  f" + llm {m.llm_first_token_ms} + tts {m.tts_first_audio_ms}", file=out)
        if (cut := seen.get("interrupted")) is not None:
            print(f"  interrupted by turn {cut.by_turn} after {cut.spoken!r}; audio stopped {cut.stop_ms} ms after the decision", file=out)


def cmd_agent(args: argparse.Namespace) -> int:
    from .agent.events import event_to_dict
    from .agent.replay import replay
    from .config import load_settings
    from .streaming.engine import Engine

    settings = load_settings(args.config, engine=_engine_flags(args), agent={
        "llm": args.llm, "llm_base_url": args.llm_base_url, "llm_model": args.llm_model,
        "asr": args.asr, "asr_base_url": args.asr_base_url, "system_prompt": args.system_prompt,
        "speech_start_ms": args.speech_start_ms, "turn_end_ms": args.turn_end_ms,
        "vad_aggressiveness": args.vad_aggressiveness,
    })
    engine = Engine(settings.engine)
    try:
        result = asyncio.run(replay(engine, settings.agent, args.input_wav, args.output_wav, args.events))
    finally:
        engine.close()
    if args.json:
        print(json.dumps([event_to_dict(e) for e in result.events]))
    else:
        _print_turns(result.events, sys.stdout)
        print(f"wrote {args.output_wav} ({result.output_seconds:.2f} s)" + (f" and {args.events}" if args.events else ""))
    return 0 if result.settled else 1


def cmd_watermark(args: argparse.Namespace) -> int:
    """Exit status 0: the watermark is there; 1: it is not; 2: the file cannot be read."""
    from .voices.watermark import detect_command

    return detect_command(args.file)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxflow", description="Streaming neural text-to-speech.")
    sub = parser.add_subparsers(dest="command", required=True)

    say = sub.add_parser("say", help="speak text into a WAV file, or stdin tokens to raw PCM on stdout")
    say.add_argument("text", nargs="?", help="text to speak, or '-' to stream tokens from stdin to PCM on stdout")
    say.add_argument("-f", "--file", help="read the text from a file")
    say.add_argument("-o", "--output", help="WAV file to write")
    say.add_argument("--stream", action="store_true", help="feed the text as LLM-like tokens through the streaming path")
    say.add_argument("--tps", type=float, default=50.0, help="tokens per second for --stream (default 50)")
    say.add_argument("--rate", type=int, help="output sample rate (default: the voice's)")
    say.add_argument("--style", choices=sorted(PRESETS), help="style preset (default neutral)")
    say.add_argument("--speed", type=float)
    say.add_argument("--expressiveness", type=float)
    say.add_argument("--volume", type=float)
    say.add_argument("--speaker", help="speaker name or index (multi-speaker voices)")
    say.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    _engine_args(say)
    say.set_defaults(func=cmd_say)

    serve = sub.add_parser("serve", help="run the HTTP/WebSocket server")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; others need API keys)")
    serve.add_argument("--port", type=int, help="port (default 8765)")
    serve.add_argument("--mqtt", metavar="URL", help="also bridge an MQTT broker, e.g. mqtt://127.0.0.1:1883 (docs/mqtt.md)")
    serve.add_argument("--wyoming", metavar="URL", help="also serve Wyoming (Home Assistant), e.g. tcp://127.0.0.1:10200")
    serve.add_argument("--zeroconf", action="store_true", default=None,
                       help="announce the Wyoming server over mDNS so Home Assistant discovers it (off by default)")
    serve.add_argument("--zeroconf-name", metavar="NAME", help="the announced name (default voxflow-HOSTNAME)")
    serve.add_argument("--zeroconf-address", metavar="IP",
                       help="the address to announce (default: the Wyoming host, or this machine's LAN address for 0.0.0.0)")
    serve.add_argument("--ssl-certfile", metavar="FILE", help="serve https:// and wss:// with this PEM certificate (chain)")
    serve.add_argument("--ssl-keyfile", metavar="FILE", help="the certificate's PEM private key, unencrypted")
    _engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    mqtt = sub.add_parser("mqtt", help="serve text-to-speech over an MQTT broker only (no HTTP)")
    mqtt.add_argument("--broker", required=True, metavar="URL", help="mqtt://[user:password@]HOST[:PORT], or mqtts:// for TLS")
    mqtt.add_argument("--prefix", help="topic prefix (default voxflow)")
    mqtt.add_argument("--share-group", help="shared-subscription group of the workers ('' = none; default voxflow)")
    _engine_args(mqtt)
    mqtt.set_defaults(func=cmd_mqtt)

    speak = sub.add_parser("speak", help="stream text as LLM-like tokens to a voxflow server (WebSocket)")
    speak.add_argument("text", help="text to speak")
    speak.add_argument("--server", default="ws://127.0.0.1:8765", help="ws://HOST:PORT, optionally with the path (default /v1/stream)")
    speak.add_argument("-o", "--output", required=True, help="WAV file to write, or '-' for raw PCM on stdout")
    speak.add_argument("--api-key", default=os.environ.get("VOXFLOW_API_KEY"), help="API key (default $VOXFLOW_API_KEY)")
    speak.add_argument("--voice", help="voice name (default: the server's)")
    speak.add_argument("--style", choices=sorted(PRESETS), help="style preset (default neutral)")
    speak.add_argument("--rate", type=int, help="output sample rate (default: the voice's)")
    speak.add_argument("--tps", type=float, default=50.0, help="tokens per second (default 50)")
    speak.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    speak.set_defaults(func=cmd_speak)

    agent = sub.add_parser("agent", help="replay a recorded call through the conversation agent, in real time")
    agent.add_argument("--input-wav", required=True, help="the person's side of the call: 16-bit PCM WAV (mono, or mixed down)")
    agent.add_argument("--output-wav", required=True, help="the bot's side, written on the same timeline")
    agent.add_argument("--events", help="JSON-lines file of every event with its time")
    agent.add_argument("--llm", choices=("echo", "openai"), help="echo (default: repeats the person) or openai")
    agent.add_argument("--llm-base-url", help="OpenAI-compatible server for --llm openai (key: $OPENAI_API_KEY)")
    agent.add_argument("--llm-model", help="model name for --llm openai")
    agent.add_argument("--system-prompt")
    agent.add_argument("--asr", choices=("pocketsphinx", "openai"), help="pocketsphinx (default, offline) or openai")
    agent.add_argument("--asr-base-url", help="OpenAI-compatible /v1/audio/transcriptions server for --asr openai")
    agent.add_argument("--speech-start-ms", type=int, help="speech before a turn starts (default 200)")
    agent.add_argument("--turn-end-ms", type=int, help="silence that ends a turn (default 600)")
    agent.add_argument("--vad-aggressiveness", type=int, choices=(0, 1, 2, 3), help="webrtcvad mode (default 2)")
    agent.add_argument("--json", action="store_true", help="print the events as one JSON array")
    _engine_args(agent)
    agent.set_defaults(func=cmd_agent)

    voices = sub.add_parser("voices", help="list voices, or add or remove one in the voice directories (docs/voices.md)")
    voices.add_argument("action", nargs="?", choices=("list", "add", "remove", "match"), default="list",
                        help="list (the default); add copies a voice into the first --voice-dir; remove deletes one")
    voices.add_argument("target", nargs="?", help="add: the .onnx file (its .onnx.json beside it); remove: the voice's name")
    voices.add_argument("--name", help="add: the name of the copy (default: the file's name less .onnx)")
    voices.add_argument("--json", action="store_true", help="list: print one JSON array")
    voices.add_argument("--reference", nargs="+", metavar="FILE", help="match: recordings of the speaker, >= 60 s of speech")
    voices.add_argument("--base", help="match: the Piper voice to transform (default: the default voice)")
    how = voices.add_mutually_exclusive_group()
    how.add_argument("--consent", metavar="FILE", help="match: the speaker reading the consent statement (docs/voices.md)")
    how.add_argument("--attest", metavar="TEXT", help="match: the recordings' source and licence, for a speaker who cannot record a statement")
    _engine_args(voices)
    voices.set_defaults(func=cmd_voices)

    watermark = sub.add_parser("watermark", help="check an audio file for the watermark of voxflow's matched voices")
    watermark_sub = watermark.add_subparsers(dest="action", required=True)
    watermark_detect = watermark_sub.add_parser("detect", help="print the score; exit 0 if marked, 1 if not, 2 if unreadable")
    watermark_detect.add_argument("file", help="audio file (wav, mp3, ogg, flac, ...)")
    watermark_detect.set_defaults(func=cmd_watermark)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except VoxflowError as exc:
        print(f"voxflow: error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
