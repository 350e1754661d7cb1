"""Three `voxflow serve` processes behind HAProxy (deploy/haproxy.cfg as shipped) and one
mosquitto, on loopback: least-connections spreads SDK clients, a rolling restart loses no
utterance, a crashed replica's clients come back through the others, and the replicas' MQTT
workers share requests through the broker. Timings are benchmarks/cluster.py's to judge; here
they only bound hangs.

The three replicas share this machine's cores with each other and with the test, so the
utterances are short and the clients few where the point is correctness.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster_harness import Cluster, running_cluster
from cluster_scenarios import TIMEOUT, Speaker, crash, drained_cleanly, rolling_restart, speaking
from test_mqtt_bridge import _client
from test_mqtt_scale_out import Listener, _answered_once, _say
from voxflow.client import AsyncVoxflowClient
from waiting import until

KEYS = [f"cluster-key-{n}" for n in range(48)]  # a key per client: no client shares another's limits


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("cluster"), 3, tuple(KEYS)) as running:
        yield running


async def connections(cluster: Cluster) -> dict[str, int]:
    return await asyncio.to_thread(cluster.connections)


async def test_least_connections_fills_the_emptiest_replica_first(cluster: Cluster):
    await asyncio.to_thread(cluster.wait_all_up)
    # Twelve idle clients one at a time, each one's replica seen in the replicas' own counts.
    placed: dict[str, list[AsyncVoxflowClient]] = {r.name: [] for r in cluster.replicas}
    for key in KEYS[:12]:
        before = await connections(cluster)
        client = await AsyncVoxflowClient(cluster.ws_url, api_key=key).connect()
        after = await connections(cluster)
        (replica,) = [name for name in after if after[name] == before[name] + 1]
        placed[replica].append(client)
    assert {name: len(clients) for name, clients in placed.items()} == {"replica1": 4, "replica2": 4, "replica3": 4}

    # Emptied, replica1 takes the new clients until it holds as many as the others: 24 clients
    # speaking at once end 11/11/10 (round robin would have made it 8/12/12).
    for client in placed.pop("replica1"):
        await client.aclose()
    await until(lambda: cluster.connections()["replica1"] == 0, TIMEOUT, poll=0.1)
    speakers = [Speaker(AsyncVoxflowClient(cluster.ws_url, api_key=key)) for key in KEYS[12:36]]
    try:
        async with asyncio.timeout(180):
            durations = await asyncio.gather(*(s.say() for s in speakers))
        held = await connections(cluster)
    finally:
        for client in [*(s.client for s in speakers), *(c for clients in placed.values() for c in clients)]:
            await client.aclose()
    assert sum(held.values()) == 32
    assert max(held.values()) - min(held.values()) <= 1, held
    assert all(s.retried == [] and s.cut == [] for s in speakers)
    reference = durations[0]
    assert reference > 1.0 and all(abs(d - reference) < 0.05 for d in durations)  # every one whole


async def test_rolling_restart_loses_no_utterance(cluster: Cluster):
    await asyncio.to_thread(cluster.wait_all_up)
    async with speaking(cluster.ws_url, KEYS[:6]) as speakers:
        restarts = await rolling_restart(cluster, speakers)
    assert [r.replica for r in restarts] == ["replica1", "replica2", "replica3"]
    assert all(drained_cleanly(r.exit_status) for r in restarts), restarts
    # HAProxy took each one out on its readiness answer (503), while it was still finishing.
    log = cluster.haproxy.log.read_text()
    for restart in restarts:
        assert f"Server voxflow/{restart.replica} is DOWN, reason: Layer7 wrong status, code: 503" in log
    assert [s.cut for s in speakers] == [[]] * len(speakers)
    # Each client's first replica was restarted under it: all of them moved, and went on.
    assert all(len(s.connections) >= 2 for s in speakers), [len(s.connections) for s in speakers]
    durations = [d for s in speakers for d in s.spoken]
    assert len(durations) >= 4 * len(speakers)
    assert all(abs(d - durations[0]) < 0.05 for d in durations)


async def test_a_crashed_replica_loses_only_its_own_clients_who_come_back(cluster: Cluster):
    await asyncio.to_thread(cluster.wait_all_up)
    async with speaking(cluster.ws_url, KEYS[:6]) as speakers:
        before = [s.client.ready for s in speakers]
        result = await crash(cluster, speakers, cluster.replica("replica2"))
        await until(lambda: all(len(s.spoken) >= 3 for s in speakers), TIMEOUT)
    moved = [i for i, s in enumerate(speakers) if s.connections[-1] is not before[i]]
    assert result.on_replica >= 1 and moved == result.moved and len(moved) == result.on_replica
    assert len(result.spoke_again_s) == len(moved)
    assert max(result.reconnect_s) < 30  # a hang bound; benchmarks/cluster.py holds the 2 s target
    for i, speaker in enumerate(speakers):
        if i not in moved:  # the others saw nothing at all
            assert (speaker.retried, speaker.cut, len(speaker.connections)) == ([], [], 1)
        else:  # at most the utterance in flight, cut by the crash
            assert len(speaker.cut) <= 1 and all(c.startswith("connection_lost") for c in speaker.cut)


def streams_done(metrics_text: str) -> float:
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "voxflow_streams_total" and sample.labels.get("reason") == "done":
                return sample.value
    return 0.0


async def test_mqtt_workers_of_the_replicas_share_requests(cluster: Cluster):
    await asyncio.to_thread(cluster.wait_all_up)

    async def done_per_replica() -> dict[str, float]:
        async with httpx.AsyncClient(timeout=10) as http:
            return {r.name: streams_done((await http.get(f"{r.http}/metrics")).text) for r in cluster.replicas}

    before = await done_per_replica()
    async with _client(cluster.broker) as client:
        for kind in ("event", "error", "audio/+"):
            await client.subscribe(f"voxflow/+/{kind}", qos=1)
        listener = Listener(client)
        listening = asyncio.create_task(listener.run())
        try:
            ids = [f"m{n}" for n in range(12)]
            for n, request_id in enumerate(ids):
                await _say(client, request_id, n)
            await listener.wait_all(ids)
            _answered_once(listener, ids)
            await asyncio.sleep(0.5)  # a second answer would have come by now
        finally:
            listening.cancel()
    assert set(listener.replies) == set(ids)
    done = [e["id"] for r in listener.replies.values() for e in r.events if e["type"] == "done"]
    assert sorted(done) == sorted(ids)
    after = await done_per_replica()
    answered = {name: after[name] - before[name] for name in after}
    assert sum(answered.values()) == len(ids) and all(answered.values()), answered  # each replica took a share
