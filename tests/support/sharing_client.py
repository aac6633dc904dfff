"""Client side of tests/test_sharing_tailnet.py: runs in the client namespace, prints a JSON report.

Acts as several tailnet peers (by switching the route's source address before each fresh
connection, as serve_tailnet_client.py does) against a real `lmlink serve --listen tailscaled`,
using only real clients: `lmlink.client.Client` / `AsyncClient` over gRPC, the `openai`
package and httpx over HTTPS, and the `lmlink share|token|usage` command line, both locally
(`--state-dir`, the owner on the server machine) and over the tailnet (`--server`).

When the scenario needs the tailnet policy changed (a grant removed), it prints
{"ask": ...} and waits for the test, which owns the LocalAPI stand-in, to answer "ok".
Established connections keep their source address, so several identities can stream at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import grpc
import httpx
import openai

from lmlink.client import AsyncClient, Client, Completed, LmlinkError, TokenDelta
from lmlink.client.security import channel_security
from lmlink.v1 import inference_pb2 as pb
from lmlink.v1 import inference_pb2_grpc as pb_grpc

OPTS = [("grpc.use_local_subchannel_pool", 1)]  # a new Client = a new connection
CFG: dict[str, Any] = {}


def use_source(name: str) -> None:
    ip = CFG["sources"][name]
    subprocess.run(["ip", "route", "replace", f"{CFG['server']}/32", "dev", CFG["wg_dev"],
                    "src", ip], check=True, timeout=10)


def ask(what: str, **kw: Any) -> None:
    print(json.dumps({"ask": what, **kw}), flush=True)
    answer = sys.stdin.readline().strip()
    assert answer == "ok", answer


def client(name: str) -> Client:
    """A fresh connection from `name`'s address, established now (so the source sticks)."""
    use_source(name)
    c = Client(CFG["grpc"], timeout=30, options=OPTS)
    c.health()  # not access-checked: connects anyone the tailnet knows
    return c


def cli(*args: str, source: str | None = None, remote: bool = False) -> dict[str, Any]:
    if source:
        use_source(source)
    where = ["--server", CFG["grpc"]] if remote else ["--state-dir", CFG["state_dir"]]
    t0 = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "lmlink.cli", *args, *where],
                         capture_output=True, text=True, timeout=30,
                         env={**os.environ, "LMLINK_CONFIG_DIR": CFG["config_dir"]})
    return {"rc": res.returncode, "out": res.stdout.strip(), "err": res.stderr.strip(),
            "seconds": round(time.monotonic() - t0, 3)}


def error(exc: LmlinkError) -> dict[str, Any]:
    return {"code": exc.code.name, "message": str(exc)}


def generate(c: Client, max_tokens: int = 16) -> dict[str, Any]:
    try:
        g = c.complete("Tell me about the river", model=CFG["model"], max_tokens=max_tokens,
                       ignore_eos=True)
        return {"ok": len(g.token_ids), "finish": g.finish_reason}
    except LmlinkError as exc:
        return error(exc)


class LongStream(threading.Thread):
    """A long generation in the background; records its tokens and how it ended."""

    def __init__(self, c: Client, max_tokens: int = 2000) -> None:
        super().__init__(daemon=True)
        self.c, self.max_tokens = c, max_tokens
        self.tokens = 0
        self.first = threading.Event()
        self.result: dict[str, Any] = {}
        self.ended_at = 0.0
        self.start()

    def run(self) -> None:
        try:
            for ev in self.c.stream(prompt="Once upon a time", model=CFG["model"],
                                    max_tokens=self.max_tokens, ignore_eos=True, timeout=60,
                                    # plain decoding: prompt lookup on this repetitive story can
                                    # finish 1,500 tokens before a 3 s expiry comes due
                                    speculate=False):
                if isinstance(ev, TokenDelta):
                    self.tokens += len(ev.token_ids)
                    if self.tokens >= 3:
                        self.first.set()
                elif isinstance(ev, Completed):
                    self.result = {"completed": ev.finish_reason}
        except LmlinkError as exc:
            self.result = error(exc)
        self.ended_at = time.monotonic()
        self.first.set()

    def outcome(self, since: float) -> dict[str, Any]:
        self.join(30)
        return {**self.result, "tokens": self.tokens,
                "ended_after": round(self.ended_at - since, 3)}


# ----- scenarios ---------------------------------------------------------------------------


def share_use_revoke() -> dict[str, Any]:
    """A local share for bob: denied -> shared -> streaming -> revoked mid-stream -> denied."""
    out: dict[str, Any] = {}
    bob = client("bob")
    out["before"] = generate(bob)
    out["add"] = cli("share", "add", "bob@example.com", "--model", CFG["model"], "--json")
    out["after_add"] = generate(bob)  # same connection: the grant applies on the next call
    stream = LongStream(bob)
    assert stream.first.wait(20), "no tokens"
    out["tokens_before_revoke"] = stream.tokens
    out["revoke"] = cli("share", "revoke", "bob@example.com")
    t = time.monotonic()
    out["stream"] = stream.outcome(t)
    out["after_revoke"] = generate(bob)
    bob.close()
    return out


def http_stream_cut() -> dict[str, Any]:
    """As above, but catching the error the openai client raises for the SSE error event."""
    out: dict[str, Any] = {}
    out["add_remote"] = cli("share", "add", "bob@example.com", "--model", CFG["model"],
                            "--json", source="owner", remote=True)
    use_source("bob")
    http = httpx.Client(verify=False, timeout=30)
    oai = openai.OpenAI(base_url=f"https://{CFG['http']}/v1", api_key="unused", http_client=http,
                        max_retries=0)
    oai.models.list()  # connect now, from bob's address
    chunks, t = 0, 0.0
    try:
        for _ in oai.chat.completions.create(
                model=CFG["model"], stream=True, max_tokens=1500,
                messages=[{"role": "user", "content": "Tell me a long story"}],
                extra_body={"ignore_eos": True}):
            chunks += 1
            if chunks == 3:
                out["revoke_remote"] = cli("share", "revoke", "bob@example.com",
                                           source="owner", remote=True)
                t = time.monotonic()
        out["error"] = None
    except openai.APIError as exc:
        out["error"] = {"type": type(exc).__name__, "message": exc.message}
    out["chunks"] = chunks
    out["seconds_after_revoke"] = round(time.monotonic() - t, 3)
    use_source("bob")  # the admin call above connected from the owner's address
    http.close()
    http = httpx.Client(verify=False, timeout=30)
    r = http.post(f"https://{CFG['http']}/v1/chat/completions",
                  json={"model": CFG["model"], "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 4})
    out["after"] = {"status": r.status_code, "body": r.json()}
    http.close()
    return out


def tailnet_grant_removed() -> dict[str, Any]:
    """mate's grant comes from the tailnet policy; it is removed while mate streams."""
    out: dict[str, Any] = {}
    mate = client("mate")
    out["before"] = generate(mate)
    stream = LongStream(mate)
    assert stream.first.wait(20), "no tokens"
    ask("drop_grant", peer="mate")
    t = time.monotonic()
    out["stream"] = stream.outcome(t)
    out["after"] = generate(mate)
    mate.close()
    return out


def group_share_expires() -> dict[str, Any]:
    """carol is in group:eng (tailnet policy marker); the group's share expires mid-stream."""
    out: dict[str, Any] = {}
    carol = client("carol")
    out["before"] = generate(carol)
    out["add"] = cli("share", "add", "group:eng", "--model", CFG["model"], "--expires", "3s",
                     "--json")
    added = time.monotonic()
    out["during"] = generate(carol)
    stream = LongStream(carol)
    assert stream.first.wait(20), "no tokens"
    out["stream"] = stream.outcome(added)
    out["after"] = generate(carol)
    carol.close()
    return out


def quota_and_recovery() -> dict[str, Any]:
    """tag:ci may use 30 tokens per (scaled) minute: use them, get refused, recover."""
    out: dict[str, Any] = {"minute_seconds": CFG["minute_seconds"]}
    out["add"] = cli("share", "add", "tag:ci", "--model", CFG["model"],
                     "--tokens-per-minute", "30", "--json")
    ci = client("ci")
    t0 = time.monotonic()
    out["first"] = generate(ci, 20)
    out["second"] = generate(ci, 20)  # only 10 left: ends with "length" at the budget
    out["grpc_refused"] = generate(ci, 20)
    http = httpx.Client(verify=False, timeout=30)
    r = http.post(f"https://{CFG['http']}/v1/chat/completions",
                  json={"model": CFG["model"], "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5})
    out["http_refused"] = {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                           "body": r.json()}
    wait = float(r.json().get("retry_after_seconds") or 0)
    out["waited"] = round(wait, 3)
    time.sleep(wait + 0.2)
    out["recovered"] = generate(ci, 5)
    out["recovered_after"] = round(time.monotonic() - t0, 3)
    r = http.post(f"https://{CFG['http']}/v1/chat/completions",
                  json={"model": CFG["model"], "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 5})
    out["http_recovered"] = r.status_code
    http.close()
    # A whole minute later, four streams at once: each is admitted with the whole budget in
    # view, together they overdraw it, and the ones over it are cut mid-answer.
    time.sleep(CFG["minute_seconds"] + 0.2)
    t1 = time.monotonic()
    streams = [LongStream(ci, 30) for _ in range(4)]
    out["overdraw"] = [s.outcome(t1) for s in streams]
    ci.close()
    return out


def max_streams() -> dict[str, Any]:
    out: dict[str, Any] = {}
    out["add"] = cli("share", "add", "bob@example.com", "--model", CFG["model"],
                     "--max-streams", "2", "--json")
    bob = client("bob")
    a, b = LongStream(bob, 300), LongStream(bob, 300)
    assert a.first.wait(20) and b.first.wait(20)
    out["third"] = generate(bob, 4)
    a.join(30)
    b.join(30)
    bob.close()
    out["streams"] = [a.result, b.result]
    return out


async def _flood_and_probe() -> dict[str, Any]:
    use_source("owner")
    flood = AsyncClient(CFG["grpc"], timeout=120, options=OPTS)
    await flood.server_info()
    n, max_tokens = 16, CFG["flood_tokens"]
    t0 = time.monotonic()
    starts: list[float] = [0.0] * n
    ends: list[float] = [0.0] * n

    async def one(i: int) -> None:
        async for ev in flood.stream(prompt=f"Story number {i}", model=CFG["model"],
                                     max_tokens=max_tokens, ignore_eos=True):
            if isinstance(ev, TokenDelta) and not starts[i]:
                starts[i] = time.monotonic() - t0
            elif isinstance(ev, Completed):
                ends[i] = time.monotonic() - t0

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    while sum(1 for s in starts if s) < 4:  # the batch is full of the flood
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    use_source("bob")
    probe = AsyncClient(CFG["grpc"], timeout=60, options=OPTS)
    await probe.health()
    sent = time.monotonic()
    first = 0.0
    async for ev in probe.stream(prompt="Quick question", model=CFG["model"], max_tokens=8,
                                 ignore_eos=True):
        if isinstance(ev, TokenDelta) and not first:
            first = time.monotonic() - sent
    sent_at = sent - t0
    await asyncio.gather(*tasks)
    await flood.close()
    await probe.close()
    served_first = sorted(range(n), key=lambda i: starts[i])[:4]
    gen_times = [ends[i] - starts[i] for i in served_first]
    return {"probe_ttft": round(first, 3), "probe_sent_at": round(sent_at, 3),
            "flood_first_tokens": [round(s, 3) for s in sorted(starts)],
            "flood_ends": [round(e, 3) for e in sorted(ends)],
            "one_generation": round(max(gen_times), 3), "flood_total": round(max(ends), 3),
            "flood_tokens": max_tokens}


def fairness() -> dict[str, Any]:
    """The owner floods 16 streams into a batch of 4; bob (share, no limits) asks once."""
    cli("share", "add", "bob@example.com", "--model", CFG["model"], "--json")
    return asyncio.run(_flood_and_probe())


def bearer_and_admin() -> dict[str, Any]:
    """A token bound to bob, used by the tagged ci node over gRPC metadata and HTTP; and who
    may run admin commands over the tailnet."""
    out: dict[str, Any] = {}
    made = cli("token", "create", "--name", "ci-script", "--as", "bob@example.com", "--json")
    token = json.loads(made["out"])["token"] if made["rc"] == 0 else ""
    out["create"] = {k: v for k, v in made.items() if k != "out"}
    use_source("ci")
    security = channel_security(CFG["grpc"])
    channel = grpc.secure_channel(CFG["grpc"], security.credentials, options=security.options)
    stub = pb_grpc.InferenceStub(channel)
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                              metadata=(("authorization", f"Bearer {token}"),))
    out["grpc_caller"] = {"login": info.caller.login_name, "source": info.caller.source}
    try:
        stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=10,
                           metadata=(("authorization", "Bearer lmk_not-a-real-token"),))
        out["grpc_bad_token"] = "accepted"
    except grpc.RpcError as exc:
        out["grpc_bad_token"] = exc.code().name
    channel.close()
    http = httpx.Client(verify=False, timeout=30)
    r = http.get(f"https://{CFG['http']}/v1/models", headers={"authorization": f"Bearer {token}"})
    out["http_models"] = {"status": r.status_code, "ids": [m["id"] for m in r.json().get("data", [])]}
    out["revoke"] = cli("token", "revoke", "ci-script")
    r = http.get(f"https://{CFG['http']}/v1/models", headers={"authorization": f"Bearer {token}"})
    out["http_after_revoke"] = {"status": r.status_code, "body": r.json()}
    http.close()
    out["list_as_owner"] = cli("share", "list", "--json", source="owner", remote=True)
    out["list_as_bob"] = cli("share", "list", "--json", source="bob", remote=True)
    out["bad_remote"] = cli("share", "add", "bob", "--model", CFG["model"], source="owner",
                            remote=True)
    out["usage"] = cli("usage", "--json")
    out["usage_by_model_remote"] = cli("usage", "--by", "model", "--json", source="owner",
                                       remote=True)
    return out


def main() -> dict[str, Any]:
    os.environ["LMLINK_CONFIG_DIR"] = CFG["config_dir"]
    report: dict[str, Any] = {}
    for name, fn in [("share_use_revoke", share_use_revoke),
                     ("http_revoke", http_stream_cut),
                     ("tailnet_grant_removed", tailnet_grant_removed),
                     ("group_share_expires", group_share_expires),
                     ("quota", quota_and_recovery),
                     ("max_streams", max_streams),
                     ("fairness", fairness),
                     ("bearer_and_admin", bearer_and_admin)]:
        t0 = time.monotonic()
        report[name] = fn()
        report[name]["scenario_seconds"] = round(time.monotonic() - t0, 2)
    return report


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        CFG.update(json.load(f))
    print(json.dumps({"report": main()}), flush=True)
