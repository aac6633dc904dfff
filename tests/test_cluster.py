"""Cluster mode on loopback: real `lmlink cluster up` (MPI backend), real gRPC clients.

Token ids must equal the single-process engine's for the same greedy requests, pipeline and
tensor parallel, 8 concurrent streams; killing a rank ends streams with UNAVAILABLE naming it,
leaves no process behind, and a new `cluster up` works.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import pytest


from conftest import REPO, lmlink_cmd
from lmlink.client import AsyncClient, Client, TokenDelta, Unavailable
from lmlink.cluster.control import HEARTBEAT_INTERVAL
from lmlink.cluster.spec import ClusterFileError, load_cluster, parse_cluster
from lmlink.engine.lockstep import Admit, Remove, StepCommands
from lmlink.engine.types import GenerationRequest, SamplingOptions
from support.collect import CollectingSink, token_ids
from support.cluster import NEEDS_MPIRUN, assert_gone, down, up

pytestmark = NEEDS_MPIRUN
PROMPTS = [f"Tell me about thing number {i}." for i in range(8)]
MAX_TOKENS = 24


SEEDED = {"temperature": 0.8, "seed": 7}


def _single_process(loaded_model, prompts: list[str], **sampling) -> list[list[int]]:
    from lmlink.engine.engine import Engine

    eng = Engine(loaded_model)
    eng.start()
    out = []
    for p in prompts:
        sink = CollectingSink()
        eng.submit(GenerationRequest("", prompt=p, sampling=SamplingOptions(
            max_tokens=MAX_TOKENS, ignore_eos=True, **sampling)), sink)
        out.append(token_ids(sink.wait()))
    eng.stop()
    return out


@pytest.fixture(scope="module")
def reference(loaded_model):
    """Single-process greedy token ids for PROMPTS (the in-process engine)."""
    return _single_process(loaded_model, PROMPTS)


@pytest.fixture(scope="module")
def seeded_reference(loaded_model):
    """Single-process token ids for PROMPTS[2] sampled with SEEDED."""
    return _single_process(loaded_model, PROMPTS[2:3], **SEEDED)[0]


async def _concurrent(address: str) -> list[list[int]]:
    async with AsyncClient(address, timeout=120) as ac:
        got = await asyncio.gather(*(ac.complete(p, max_tokens=MAX_TOKENS, ignore_eos=True)
                                     for p in PROMPTS))
    return [g.token_ids for g in got]


def _check_cluster(name: str, reference: list[list[int]], seeded_reference: list[int]) -> None:
    c = up(name)
    try:
        with Client(c.address, timeout=60) as client:
            assert client.health() == "SERVING"
            solo = client.complete(PROMPTS[0], max_tokens=MAX_TOKENS, ignore_eos=True)
            assert solo.token_ids == reference[0]
            # stop strings end on rank 0 and leave every rank's batch at the next step
            cut = client.complete(PROMPTS[1], max_tokens=MAX_TOKENS, ignore_eos=True,
                                  stop=[client.complete(PROMPTS[1], max_tokens=8,
                                                        ignore_eos=True).text[-3:]])
            assert cut.finish_reason == "stop"
            # every rank samples alike, with the request's own key: the single process's tokens
            seeded = client.complete(PROMPTS[2], max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)
            assert seeded.token_ids == seeded_reference != reference[2]
        assert asyncio.run(_concurrent(c.address)) == reference
        # and once more, after the prompt cache saw these prompts (hits on every rank)
        assert asyncio.run(_concurrent(c.address)) == reference
        _check_status(c.address, sharding=load_cluster(REPO / "cluster" / name).sharding)
    finally:
        down(c)


def _check_status(address: str, sharding: str) -> None:
    """`lmlink status --json` on rank 0 lists every rank from its heartbeats; while a stream
    decodes, every rank reports a token rate."""
    with Client(address, timeout=60) as client:
        stream = client.stream(prompt="Once upon a time", max_tokens=1500, ignore_eos=True)
        it = iter(stream)
        while not isinstance(next(it), TokenDelta):
            pass
        time.sleep(4 * HEARTBEAT_INTERVAL)  # a few heartbeats while decoding
        try:
            r = subprocess.run(lmlink_cmd("status", "--server", address, "--json"),
                               capture_output=True, text=True, timeout=60)
        finally:
            stream.cancel()
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["cluster_backend"] == "mpi" and st["cluster_sharding"] == sharding
    assert [x["rank"] for x in st["ranks"]] == [0, 1]
    for x in st["ranks"]:
        assert x["host"] == "local" and x["address"] == "127.0.0.1"
        assert x["state"] == "ready" and x["memory_bytes"] > 0 and x["model_bytes"] > 0
        assert x["tokens_per_second"] > 1, x  # the ranks decode together
    assert st["ranks"][1]["seconds_since_heartbeat"] < 5
    human = subprocess.run(lmlink_cmd("status", "--server", address),
                           capture_output=True, text=True, timeout=60)
    assert human.returncode == 0, human.stderr
    assert f"2 ranks, mpi backend, {sharding}-parallel" in human.stdout
    assert "rank 1   local (127.0.0.1): ready" in human.stdout


def test_pipeline_2_ranks_match_single_process(reference, seeded_reference):
    _check_cluster("local-2-mpi.toml", reference, seeded_reference)


def test_tensor_2_ranks_match_single_process(reference, seeded_reference):
    _check_cluster("local-2-mpi-tensor.toml", reference, seeded_reference)


def test_tensor_4_ranks_match_single_process(reference):
    c = up("local-4-mpi-tensor.toml", timeout=90)
    try:
        assert asyncio.run(_concurrent(c.address)) == reference
    finally:
        down(c)


def test_killed_rank_fails_streams_and_cluster_restarts():
    c = up("local-2-mpi.toml", "--linger", "2")
    pids = c.all_pids()
    try:
        with Client(c.address, timeout=60) as client:
            # Without speculation: the toy model's repetitive text would otherwise be drafted
            # so well that 2,000 tokens are all computed before the kill is noticed.
            stream = client.stream(prompt="Once upon a time", max_tokens=2000,
                                   ignore_eos=True, speculate=False)
            got = 0
            t_kill = None
            with pytest.raises(Unavailable) as err:
                for _ in stream:
                    got += 1
                    if got == 5:
                        os.kill(c.pids[1], signal.SIGKILL)
                        t_kill = time.monotonic()
            assert t_kill is not None and time.monotonic() - t_kill < 10
            assert "rank 1" in str(err.value)
            # rank 0 still answers during the linger, and says it cannot serve
            deadline = time.monotonic() + 1.5
            while client.health() != "NOT_SERVING" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.health() == "NOT_SERVING"
        c.proc.wait(30)
        assert c.proc.returncode == 1
        assert_gone(pids)
    finally:
        down(c)  # a failed check must not leave the cluster running into the next test
    c2 = up("local-2-mpi.toml")
    try:
        with Client(c2.address, timeout=60) as client:
            assert len(client.complete("The", max_tokens=5, ignore_eos=True).token_ids) == 5
    finally:
        down(c2)


def test_step_commands_round_trip():
    cmds = StepCommands(
        [Admit("a", [1, 2, 3], 9, SamplingOptions(temperature=0.5, seed=3, stop=("x",)), 2)],
        [Remove("b", "stop")],
    )
    assert StepCommands.decode(cmds.encode()) == cmds
    assert not StepCommands()


def test_cluster_file_validation(tmp_path):
    spec = load_cluster(REPO / "cluster" / "studio-4x-tb5-rdma.toml")
    assert spec.size == 4 and spec.backend == "jaccl"
    for name in os.listdir(REPO / "cluster"):
        if name.endswith(".toml"):
            load_cluster(REPO / "cluster" / name)
    with pytest.raises(ClusterFileError, match="backend"):
        parse_cluster({"backend": "carrier-pigeon", "hosts": [{"address": "a", "slots": 2}]})
    with pytest.raises(ClusterFileError, match="at least 2 ranks"):
        parse_cluster({"hosts": [{"address": "a"}]})


def test_cluster_check_cli():
    r = subprocess.run(lmlink_cmd("cluster", "check", str(REPO / "cluster" / "local-2-mpi.toml")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "versions" in r.stdout and "memory" in r.stdout
