"""The deployment files Docker would use, checked where Docker cannot run: the image is built by
the commands CI runs, its health check is the readiness probe of a live server, its command
refuses to start without keys, and deploy/compose.yaml agrees with deploy/haproxy.cfg."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from cluster_harness import REPO, HAProxy, check_config
from server_harness import free_port, run_server
from voxflow.config import load_settings
from voxflow.streaming.engine import Engine

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "deploy" / "compose.yaml"
VENV_BIN = str(Path(sys.executable).parent)


def instructions() -> list[tuple[str, str]]:
    """(KEYWORD, arguments) of each Dockerfile instruction, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(keyword.upper(), rest.strip()) for keyword, _, rest in (line.partition(" ") for line in lines)]


def instruction(keyword: str) -> list[str]:
    return [args for kw, args in instructions() if kw == keyword]


def healthcheck_command() -> str:
    (args,) = instruction("HEALTHCHECK")
    return args.split(" CMD ", 1)[1]


def test_the_image_installs_with_the_script_make_setup_runs():
    makefile = (REPO / "Makefile").read_text()
    assert "sh deploy/install.sh $(VENV) -e '.[test]'" in makefile
    assert any("sh deploy/install.sh /opt/voxflow ." in run for run in instruction("RUN"))
    # One torch pin: the one the install script puts first must be the project's own.
    pinned = re.search(r"torch==([\w.]+)", (REPO / "deploy" / "install.sh").read_text()).group(1)
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={pinned}" in dependencies


def test_the_image_warms_its_voice_with_voxflow_say(tmp_path: Path):
    (warm,) = [run for run in instruction("RUN") if run.startswith("voxflow say")]
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    done = subprocess.run(["sh", "-c", warm], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_the_image_runs_as_a_user_and_serves_every_address_only_with_keys():
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    (cmd,) = instruction("CMD")
    command = json.loads(cmd)
    assert command == ["voxflow", "serve", "--host", "0.0.0.0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")} | {"PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "needs at least one API key" in refused.stderr


def test_the_image_health_check_is_the_readiness_probe(engine: Engine):
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}

    def healthy(port: int) -> bool:
        check = subprocess.run(["sh", "-c", healthcheck_command()], env=env | {"VOXFLOW_PORT": str(port)},
                               capture_output=True, timeout=30)
        return check.returncode == 0

    with run_server(engine) as server:
        port = int(server.http.rsplit(":", 1)[1])
        assert healthy(port)
        server.state.stopping = True  # what SIGTERM sets first
        assert not healthy(port)
    assert not healthy(free_port())  # nothing listening


def test_compose_agrees_with_the_haproxy_config():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    haproxy = services["haproxy"]
    replicas = {name: spec for name, spec in services.items() if name.startswith("voxflow")}
    addresses = {k: v for k, v in haproxy["environment"].items() if k.startswith("VOXFLOW_REPLICA_")}
    # A server line for every replica service, and no other.
    assert sorted(addresses.values()) == sorted(f"{name}:8765" for name in replicas)
    checked = check_config(haproxy["environment"])
    # The replicas' names resolve inside compose's network only; HAProxy keeps asking (resolvers).
    warnings = [line for line in checked.stderr.splitlines() if "WARNING" in line and "could not resolve address" not in line]
    assert checked.returncode == 0 and not warnings, checked.stderr

    proxy = ipaddress.ip_address(haproxy["networks"]["voxflow"]["ipv4_address"])
    (pool,) = compose["networks"]["voxflow"]["ipam"]["config"]
    assert proxy in ipaddress.ip_network(pool["subnet"]) and proxy not in ipaddress.ip_network(pool["ip_range"])
    for spec in replicas.values():
        env = {k: str(v) for k, v in spec["environment"].items()} | {"VOXFLOW_API_KEYS": "k1"}
        settings = load_settings(env=env, server={"host": "0.0.0.0"})  # the image's command
        assert settings.server.trusted_proxies == (str(proxy),)
        assert float(spec["stop_grace_period"].removesuffix("s")) > settings.server.grace_seconds
        assert settings.server.mqtt_url == "mqtt://mosquitto:1883" and "mosquitto" in services


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_the_haproxy_config_expands_for_one_to_three_replicas(tmp_path: Path, replicas: int):
    haproxy = HAProxy([f"127.0.0.1:{8000 + n}" for n in range(replicas)], tmp_path)
    checked = check_config(haproxy.environment())
    assert checked.returncode == 0 and "WARNING" not in checked.stdout + checked.stderr, checked.stdout + checked.stderr
