"""The one typed configuration object, read from defaults, a TOML file, VOXFLOW_* env and flags.

Later sources override earlier ones. Defaults serve a single machine out of the box.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from .errors import InvalidRequest


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


PRECISIONS = ("auto", "float32", "bfloat16")  # decoder_precision, flow_precision


@dataclass(frozen=True)
class EngineConfig:
    voice: str = "en_US-joe-medium"  # default voice name
    voice_dirs: tuple[Path, ...] = ()  # extra directories of Piper voices (*.onnx + *.onnx.json)
    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    half: bool = False  # float16 weights (GPU only)
    # HiFi-GAN's precision: "float32"; "bfloat16" (CPU), or "auto": bfloat16 on CPUs with
    # bfloat16 instructions (AVX512-BF16, AMX), float32 elsewhere. bfloat16 decodes ~2x faster;
    # its quality guards (WER, spectral distance to float32, streamed against whole) hold
    # (docs/BENCHMARKS.md, "Throughput").
    decoder_precision: str = "auto"
    # The same choice for the flow's dilated convolutions (the rest of the flow stays float32):
    # the acoustic step ~1.5-2x faster in bfloat16, under the same guards (mixed_precision.py).
    flow_precision: str = "auto"
    threads: int = 0  # torch intra-op threads per worker; 0 = auto (see layout)
    workers: int = 0  # compute threads sharing the model(s); 0 = auto (see layout)
    seed: int = 0  # default noise seed per stream: the same text and seed give the same audio
    # Acoustic steps of different streams queued at once that run as one batch (streams that
    # start together: ~1.8x less compute for their first steps). A batched step's audio equals
    # the step alone up to float rounding, not bit for bit; 1 runs every step alone, sizes a
    # reply's first decoder block by its text alone and keeps a lone stream's jobs on their
    # worker's threads (scheduler.Widening), which keeps a seeded reply's audio bit-identical
    # however busy the machine is.
    max_batch: int = 8
    max_text_chars: int = 100_000  # text one stream may receive
    # Voices loaded at once (docs/voices.md): past either bound the least recently used voice
    # no stream holds is unloaded; with every loaded voice held, a new one is refused.
    max_loaded_voices: int = 4
    max_loaded_voice_mb: int = 512  # counted as the voices' model file sizes

    def layout(self, concurrent: bool) -> tuple[int, int]:
        """(workers, threads per worker). Auto: a server (concurrent) runs one single-threaded
        worker per core, which gives the most streams in real time; a single job (a CLI call)
        gets one worker using every core, which gives the fastest single rendering."""
        cores = _cores()
        workers = self.workers or (cores if concurrent else 1)
        return workers, self.threads or max(1, cores // workers)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"  # loopback by default; any other address requires api_keys
    port: int = 8765
    api_keys: tuple[str, ...] = ()  # accepted as "Authorization: Bearer KEY" or "xi-api-key: KEY"
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the HTTP API
    grace_seconds: float = 10.0  # on SIGTERM: time in-flight streams get to finish
    # Admission (docs/security.md): every cap has a global and a per-client value; per-client caps
    # bind API keys and non-loopback addresses.
    max_connections: int = 512  # TCP connections of every kind the HTTP server holds; past it, 503
    max_sockets: int = 64  # open WebSocket connections (native and ElevenLabs)
    max_sockets_per_identity: int = 16
    max_unauthenticated_sockets: int = 32  # sockets still to send their key (ElevenLabs: in the first message)
    max_unauthenticated_per_address: int = 4
    auth_timeout_seconds: float = 5.0  # a socket that sends no key within this is closed
    max_http_streams: int = 32  # POST /v1/audio/speech responses being streamed
    max_http_streams_per_identity: int = 8
    # POST /v1/watermark/detect in flight: each holds a compute thread for up to ~2 s (120 s of
    # audio), time taken from synthesis, so one at a time unless the operator says otherwise.
    max_watermark_checks: int = 1
    max_conversations_per_identity: int = 2  # of AgentConfig.max_conversations
    max_wyoming_connections: int = 16
    max_wyoming_per_address: int = 4
    max_contexts_per_socket: int = 8
    max_message_chars: int = 10_000  # text in one message
    max_message_bytes: int = 256 * 1024  # one WebSocket or Wyoming frame, before it is parsed
    allowed_hosts: tuple[str, ...] = ()  # Host names besides loopback ones a keyless loopback server answers
    requests_per_second: float = 20.0  # per API key (or per client address without keys)
    send_timeout_seconds: float = 5.0  # a context whose audio cannot be sent for this long is dropped
    cache_enabled: bool = True
    cache_path: str = "~/.cache/voxflow/audio-cache.sqlite3"
    cache_max_mb: int = 256
    warmup_phrases: tuple[str, ...] = ("Hello!", "One moment, please.", "Sorry, I didn't catch that.")
    voice_aliases: tuple[str, ...] = ()  # "alloy=en_US-joe-medium" pairs; unnamed OpenAI voices map to the default voice
    max_voice_upload_mb: int = 256  # one POST /v1/voices upload (.onnx and .onnx.json together)
    ice_servers: tuple[str, ...] = ()  # WebRTC STUN/TURN URLs; none by default (no public STUN server)
    webrtc_loopback: bool = False  # offer 127.0.0.1 ICE candidates (tests, single-host demos)
    max_webrtc_sessions: int = 16
    max_webrtc_sessions_per_identity: int = 4
    webrtc_idle_timeout_seconds: float = 30.0  # a session whose peer has gone quiet is closed
    mqtt_url: str = ""  # e.g. mqtt://127.0.0.1:1883: run the MQTT bridge beside the HTTP server
    wyoming_url: str = ""  # e.g. tcp://127.0.0.1:10200: run a Wyoming server beside the HTTP server
    # Announce the Wyoming server over mDNS (zeroconf) so Home Assistant discovers it. Off by
    # default: announcing a service to the whole LAN is the user's decision, not a default.
    zeroconf: bool = False
    zeroconf_name: str = ""  # the service's instance name; empty: voxflow-<hostname>
    # The address announced; empty: the Wyoming host, or this machine's LAN address when that
    # host is a wildcard (0.0.0.0, ::). A loopback Wyoming host needs one given explicitly.
    zeroconf_address: str = ""
    # TLS for HTTP and WebSocket (https://, wss://): PEM files handed to uvicorn; both or neither.
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # Reverse proxies (addresses or CIDR networks) whose X-Forwarded-For names the client for
    # per-client limits; from any other peer the header is ignored. None by default.
    trusted_proxies: tuple[str, ...] = ()
    mqtt_prefix: str = "voxflow"  # topic prefix of the MQTT bridge (docs/mqtt.md)
    mqtt_username: str = ""
    mqtt_password: str = ""
    mqtt_tls: bool = False  # TLS to the broker (also implied by an mqtts:// URL)
    mqtt_audio_qos: int = 0  # audio messages; requests, events and errors use QoS 1
    mqtt_share_group: str = "voxflow"  # workers in one group share the requests; "" = every worker answers every request
    mqtt_hermes: bool = True  # also answer Rhasspy Hermes hermes/tts/say
    mqtt_max_per_device: int = 4  # requests in flight per device (or Hermes site)
    mqtt_max_in_flight: int = 32  # requests in flight on the whole bridge

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class AgentConfig:
    """The conversation agent (voxflow/agent): turn-taking, recognition, the LLM, the voice."""

    vad_aggressiveness: int = 2  # webrtcvad mode: 0 lets most audio count as speech, 3 the least
    vad_frame_ms: int = 30  # 10, 20 or 30: webrtcvad's frame sizes
    speech_start_ms: int = 200  # speech before a turn starts (and before it interrupts the bot)
    turn_end_ms: int = 600  # silence after speech that ends the turn
    preroll_ms: int = 300  # audio from before the speech's detected start, given to ASR too
    max_turn_seconds: float = 30.0  # a turn this long is ended even while the person speaks
    asr: str = "pocketsphinx"  # "pocketsphinx" (offline, en-us) or "openai" (/v1/audio/transcriptions)
    asr_base_url: str = ""  # for asr="openai", e.g. http://127.0.0.1:8000/v1
    asr_model: str = "whisper-1"
    asr_api_key: str = ""  # for asr="openai"; empty: OPENAI_API_KEY
    llm: str = "echo"  # "echo" (repeats the person, offline) or "openai" (streaming chat completions)
    llm_base_url: str = ""  # for llm="openai"; empty: the OpenAI API
    llm_model: str = "gpt-4o-mini"
    llm_api_key: str = ""  # for llm="openai"; empty: OPENAI_API_KEY
    llm_timeout_seconds: float = 10.0  # longest wait for the first piece of a reply, and between pieces
    system_prompt: str = "You are a helpful voice assistant. Answer briefly, in plain spoken sentences."
    max_history_messages: int = 20  # user and assistant messages kept for the LLM (oldest go first)
    max_reply_chars: int = 4_000  # a longer reply is cut there
    tts_voice: str = ""  # the agent's voice; empty: the engine's default
    tts_style: str = ""  # a style preset for the agent's voice; empty: neutral
    max_conversations: int = 4  # agents running at once on a server


@dataclass(frozen=True)
class Settings:
    engine: EngineConfig = EngineConfig()
    server: ServerConfig = ServerConfig()
    agent: AgentConfig = AgentConfig()


_ENV_PREFIX = "VOXFLOW_"
_TUPLE_FIELDS = {"voice_dirs", "api_keys", "cors_origins", "warmup_phrases", "voice_aliases", "ice_servers", "allowed_hosts", "trusted_proxies"}


def _coerce(name: str, kind: str, value: Any) -> Any:
    """kind is the field's annotation as text (postponed annotations)."""
    try:
        if kind == "bool":
            return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes", "on")
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if name in _TUPLE_FIELDS:
            # Environment lists are comma separated (paths: os.pathsep separated).
            sep = os.pathsep if name == "voice_dirs" else ","
            items = value.split(sep) if isinstance(value, str) else value
            items = tuple(str(i).strip() for i in items if str(i).strip())
            return tuple(Path(i) for i in items) if name == "voice_dirs" else items
        return str(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"config {name}: cannot use {value!r}: {exc}") from exc


def _build(cls: type, table: Mapping[str, Any], env: Mapping[str, str], overrides: Mapping[str, Any]) -> Any:
    values: dict[str, Any] = dict(table)
    for f in fields(cls):
        if (raw := env.get(_ENV_PREFIX + f.name.upper())) is not None:
            values[f.name] = raw
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name: f.type for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise InvalidRequest(f"unknown {cls.__name__} keys: {', '.join(sorted(unknown))}")
    return replace(cls(), **{k: _coerce(k, known[k], v) for k, v in values.items()})


def _read_file(file: str | Path | None, env: Mapping[str, str]) -> dict[str, Any]:
    path = file or env.get(_ENV_PREFIX + "CONFIG")
    if not path:
        return {}
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def load_config(file: str | Path | None = None, env: Mapping[str, str] | None = None, **overrides: Any) -> EngineConfig:
    env = os.environ if env is None else env
    return _build(EngineConfig, _read_file(file, env).get("engine", {}), env, overrides)


def load_settings(
    file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    engine: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    agent: Mapping[str, Any] | None = None,
) -> Settings:
    """All settings: defaults < TOML file ([engine], [server], [agent]) < VOXFLOW_* < overrides."""
    env = os.environ if env is None else env
    table = _read_file(file, env)
    settings = Settings(
        engine=_build(EngineConfig, table.get("engine", {}), env, engine or {}),
        server=_build(ServerConfig, table.get("server", {}), env, server or {}),
        agent=_build(AgentConfig, table.get("agent", {}), env, agent or {}),
    )
    if not settings.server.loopback and not settings.server.api_keys:
        raise InvalidRequest(f"binding {settings.server.host} needs at least one API key (api_keys / VOXFLOW_API_KEYS)")
    check_zeroconf(settings.server)
    proxy_networks(settings.server.trusted_proxies)
    return settings


WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})  # a Wyoming host that listens on every interface


def _ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(entries: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """`trusted_proxies` as networks (a bare address is a network of one); refuses what is neither."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise InvalidRequest(f"trusted_proxies: {entry[:80]!r} is not an IP address or network (e.g. 10.0.0.5, 10.0.0.0/24)") from None
    return tuple(networks)


def check_zeroconf(server: ServerConfig) -> None:
    """Refuses, before anything starts, an announcement Home Assistant could not use: one for
    no Wyoming TCP server, or one whose address only this machine can reach."""
    if not server.zeroconf:
        return
    url = urlsplit(server.wyoming_url)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme != "tcp" or not port:
        raise InvalidRequest("zeroconf announces the Wyoming server: it needs wyoming_url tcp://HOST:PORT with a port (--wyoming)")
    name = server.zeroconf_name
    if len(name.encode()) > 63 or "." in name or not name.isprintable():
        raise InvalidRequest(f"zeroconf_name {name[:80]!r}: at most 63 bytes, printable, without dots (an mDNS label)")
    if server.zeroconf_address:
        address = _ip(server.zeroconf_address)
        if address is None or address.is_unspecified:
            raise InvalidRequest(f"zeroconf_address {server.zeroconf_address!r} is not an address a client can connect to")
        if address.version == 6 and address.is_loopback:
            raise InvalidRequest("zeroconf_address ::1: mDNS does not work on IPv6's loopback; announce 127.0.0.1")
        return
    host = url.hostname or ""
    if host in WILDCARD_HOSTS:
        return
    address = _ip(host)
    if host == "localhost" or (address is not None and address.is_loopback):
        # Announced, a loopback address would send every other machine's Home Assistant to itself.
        raise InvalidRequest(
            f"zeroconf: the Wyoming server listens on {host}, which no other machine can reach; bind a LAN "
            "address (e.g. --wyoming tcp://0.0.0.0:10200), or give the address to announce (zeroconf_address / "
            "--zeroconf-address; 127.0.0.1 for a Home Assistant on this machine)"
        )
    if address is None:
        raise InvalidRequest(f"zeroconf: the Wyoming host {host!r} is a name; give the address to announce (zeroconf_address / --zeroconf-address)")
