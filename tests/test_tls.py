"""TLS: https:// and wss:// with a certificate from a throwaway CA (trustme), driven by the real
`openai` SDK and the real `websockets` client; and every way a TLS setting can be unusable."""

from __future__ import annotations

import io
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from openai import AsyncOpenAI
from websockets.asyncio.client import connect

from server_harness import RunningServer, free_port, run_server
from test_native_ws import check_context_stream, greeted, speak
from voxflow.config import ServerConfig
from voxflow.errors import InvalidRequest
from voxflow.streaming.engine import Engine
from voxflow.transports.runner import check_tls

OPENAI_RATE = 24_000


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def write_pair(directory: Path, cert: trustme.LeafCert) -> tuple[Path, Path]:
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


@pytest.fixture(scope="module")
def tls_files(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("tls"), ca.issue_cert("127.0.0.1"))


@pytest.fixture(scope="module")
def tls_server(engine: Engine, tls_files: tuple[Path, Path]) -> Iterator[RunningServer]:
    cert_file, key_file = tls_files
    with run_server(engine, ssl_certfile=str(cert_file), ssl_keyfile=str(key_file)) as running:
        yield running


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def rms(pcm: bytes) -> float:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples**2))) if len(samples) else 0.0


async def test_openai_sdk_gets_speech_over_https(tls_server: RunningServer, ca: trustme.CA) -> None:
    assert tls_server.http.startswith("https://")
    async with httpx.AsyncClient(verify=trusting(ca), timeout=120) as http:
        client = AsyncOpenAI(base_url=tls_server.http + "/v1", api_key="x", http_client=http, max_retries=0)
        response = await client.audio.speech.create(
            model="tts-1", voice="alloy", input="This answer travelled over TLS.", response_format="pcm"
        )
        pcm = response.content
    assert response.response.url.scheme == "https"
    assert 1.0 < len(pcm) / 2 / OPENAI_RATE < 5.0
    assert rms(pcm) > 300


async def test_native_stream_over_wss(tls_server: RunningServer, ca: trustme.CA) -> None:
    assert tls_server.ws.startswith("wss://")
    async with connect(f"{tls_server.ws}/v1/stream", ssl=trusting(ca), proxy=None, open_timeout=30) as ws:
        await greeted(ws)
        events = await speak(ws, "tls", "Hello from behind a secure socket.")
    frames = check_context_stream(events, "tls", sample_rate=22_050)
    assert len(frames) * 0.02 > 1.0


async def test_a_client_that_does_not_trust_the_ca_fails_the_handshake(tls_server: RunningServer, ca: trustme.CA) -> None:
    # The system's CAs, which do not include the throwaway one.
    untrusting = ssl.create_default_context()
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(f"{tls_server.ws}/v1/stream", ssl=untrusting, proxy=None, open_timeout=30):
            pass
    async with httpx.AsyncClient(verify=untrusting, timeout=30) as http:
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await http.get(f"{tls_server.http}/health")
    # Plain HTTP to the TLS port is no way round it.
    async with httpx.AsyncClient(timeout=30) as http:
        with pytest.raises(httpx.HTTPError):
            await http.get(tls_server.http.replace("https://", "http://") + "/health")
    # And the failed handshakes left the server serving.
    async with httpx.AsyncClient(verify=trusting(ca), timeout=30) as http:
        assert (await http.get(f"{tls_server.http}/health")).status_code == 200


# -- settings that cannot be used ---------------------------------------------------------------


def config(cert: Path | str = "", key: Path | str = "") -> ServerConfig:
    return replace(ServerConfig(), ssl_certfile=str(cert), ssl_keyfile=str(key))


@pytest.mark.parametrize("given", ["cert", "key"])
def test_a_certificate_without_its_key_or_the_reverse_is_refused(tls_files: tuple[Path, Path], given: str) -> None:
    cert_file, key_file = tls_files
    settings = config(cert=cert_file) if given == "cert" else config(key=key_file)
    with pytest.raises(InvalidRequest, match="both a certificate and its key"):
        check_tls(settings)


def test_a_missing_file_is_refused_by_name(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert_file, _ = tls_files
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(InvalidRequest, match=f"{missing}.*cannot be used: .*No such file"):
        check_tls(config(cert_file, missing))


def test_a_file_that_is_not_pem_is_refused(tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    _, key_file = tls_files
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(InvalidRequest, match="cannot be used"):
        check_tls(config(junk, key_file))


def test_a_key_of_another_certificate_is_refused(ca: trustme.CA, tls_files: tuple[Path, Path], tmp_path: Path) -> None:
    cert_file, _ = tls_files
    _, other_key = write_pair(tmp_path, ca.issue_cert("127.0.0.1"))
    with pytest.raises(InvalidRequest, match="cannot be used: .*KEY_VALUES_MISMATCH"):
        check_tls(config(cert_file, other_key))


def test_an_encrypted_key_is_refused_without_a_password_prompt(ca: trustme.CA, tmp_path: Path) -> None:
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = write_pair(tmp_path, cert)
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    key_file.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"secret")
    ))
    with pytest.raises(InvalidRequest, match="encrypted"):
        check_tls(config(cert_file, key_file))


# -- the command --------------------------------------------------------------------------------

COMMAND = [sys.executable, "-m", "voxflow.cli", "serve"]


def clean_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}, **extra}


def test_serve_refuses_a_certificate_without_its_key_before_starting(tls_files: tuple[Path, Path]) -> None:
    cert_file, _ = tls_files
    proc = subprocess.run([*COMMAND, "--port", str(free_port()), "--ssl-certfile", str(cert_file)],
                          env=clean_env(), capture_output=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert b"voxflow: error [invalid_request]: TLS needs both a certificate and its key" in proc.stderr
    assert b"Traceback" not in proc.stderr
    assert b"serving on" not in proc.stdout


def test_serve_with_tls_from_the_config_file_says_https_and_serves_it(
    tls_files: tuple[Path, Path], ca: trustme.CA, tmp_path: Path
) -> None:
    """The real `voxflow serve` (runner.serve, not the test harness), its TLS read from the
    config file's [server] table as every other server setting is."""
    cert_file, key_file = tls_files
    port = free_port()
    config_file = tmp_path / "voxflow.toml"
    config_file.write_text(f'[server]\nport = {port}\nssl_certfile = "{cert_file}"\nssl_keyfile = "{key_file}"\n')
    proc = subprocess.Popen([*COMMAND, "--config", str(config_file)], env=clean_env(VOXFLOW_CACHE_ENABLED="false"),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        banner = proc.stdout.readline().decode()
        assert f"https://127.0.0.1:{port}" in banner and f"wss://127.0.0.1:{port}/v1/stream" in banner, banner
        deadline = time.monotonic() + 120
        with httpx.Client(verify=trusting(ca), timeout=2) as http:
            while True:
                try:
                    health = http.get(f"https://127.0.0.1:{port}/health")
                    if health.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.monotonic() < deadline, "server did not become ready"
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_elevenlabs_sdk_realtime_speaks_over_wss(
    tls_server: RunningServer, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SDK's convert_realtime always connects with wss:// and takes no SSL options; a
    # certificate it trusts through the standard SSL_CERT_FILE is the only setting changed.
    from elevenlabs import ElevenLabs

    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    client = ElevenLabs(base_url=tls_server.http, api_key="unused-without-keys")
    text = iter(["This answer ", "travelled over ", "TLS to the ", "ElevenLabs SDK."])
    mp3 = b"".join(client.text_to_speech.convert_realtime(voice_id="21m00Tcm4TlvDq8ikWCM", text=text))
    # Its default format, mp3_44100_128, decoded by FFmpeg.
    with av.open(io.BytesIO(mp3)) as file:
        pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in file.decode(audio=0)])
        rate = file.streams.audio[0].rate
    assert rate == 44100 and 1.5 < len(pcm) / rate < 8.0
    assert float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) > 0.01
