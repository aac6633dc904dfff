"""`--listen tsnet` as a private tailnet node: a `tailscaled --tun=userspace-networking` child.

An embedded node must show who is calling and what the tailnet policy grants them (WhoIs with
user profile and CapMap). tailscale-py cannot (no CapMap, DERP only, public control only), so
when a `tailscaled` binary is available lmlink runs its own: a child process in userspace
networking mode (no root, no TUN, no effect on the host's own Tailscale), with its state and
LocalAPI socket in `<state_dir>/tsnet/` (dir 0700). The node then behaves exactly like
`--listen tailscaled` on a userspace node: loopback listener, WhoIs on each forwarded
connection, grants from the policy. Logging in uses the auth key once; later starts resume
from the state dir.

The binary: `$LMLINK_TAILSCALED`, else `tailscaled` on PATH (Linux: the tailscale package;
macOS: `brew install tailscale` provides the open-source tailscaled). The `tailscale` CLI
next to it (or on PATH) performs the login.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmlink.net.files import private_dir

log = logging.getLogger(__name__)

TAILSCALED_ENV = "LMLINK_TAILSCALED"


class ChildUnavailable(RuntimeError):
    """No tailscaled to run, or it could not join; one-line reason."""


def find_tailscaled() -> tuple[str, str] | None:
    """(tailscaled, tailscale) binaries, or None when there is no tailscaled to run."""
    daemon = os.environ.get(TAILSCALED_ENV) or shutil.which("tailscaled")
    if not daemon or not os.access(daemon, os.X_OK):
        return None
    cli = Path(daemon).with_name("tailscale")
    cli_path = str(cli) if os.access(cli, os.X_OK) else shutil.which("tailscale")
    return (daemon, cli_path) if cli_path else None


@dataclass
class ChildConfig:
    hostname: str
    state_dir: Path
    auth_key_file: str | None = None
    auth_key: str | None = field(default=None, repr=False)
    control_url: str | None = None
    start_timeout: float = 60.0


class TailscaledChild:
    """A running private tailscaled; `socket` is its LocalAPI."""

    def __init__(self, proc: asyncio.subprocess.Process, config: ChildConfig, socket: Path,
                 started: float) -> None:
        self.proc = proc
        self.config = config
        self.socket = socket
        self.startup_seconds = started

    @classmethod
    async def start(cls, config: ChildConfig, binaries: tuple[str, str]) -> TailscaledChild:
        daemon, cli = binaries
        t0 = time.monotonic()
        d = private_dir(config.state_dir)
        sock = d / "tailscaled.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        logf = open(d / "tailscaled.log", "ab")
        try:
            proc = await asyncio.create_subprocess_exec(
                daemon, "--tun=userspace-networking", "--statedir", str(d / "state"),
                "--socket", str(sock), "--port", "0", "--no-logs-no-support",
                stdout=logf, stderr=logf, start_new_session=True)
        finally:
            logf.close()
        child = cls(proc, config, sock, 0.0)
        try:
            await child._wait(lambda: sock.exists(), "its LocalAPI socket", 15)
            if not await child._running():
                await child._login(cli)
            await child._wait_async(child._running, "Running state", config.start_timeout)
        except BaseException:
            await child.aclose()
            raise
        child.startup_seconds = time.monotonic() - t0
        log.info("private tailscaled (tsnet mode) up in %.1f s", child.startup_seconds)
        return child

    async def _wait(self, ok, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            if self.proc.returncode is not None:
                raise ChildUnavailable(f"tailscaled exited ({self.proc.returncode}); "
                                       f"see {self.config.state_dir / 'tailscaled.log'}")
            if time.monotonic() > deadline:
                raise ChildUnavailable(f"tailscaled: no {what} after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    async def _wait_async(self, ok, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not await ok():
            if time.monotonic() > deadline:
                raise ChildUnavailable(f"tsnet node did not reach {what} in {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def _running(self) -> bool:
        from lmlink.net.localapi import LocalAPI, LocalAPIError

        try:
            await LocalAPI(str(self.socket)).aself_node()
        except LocalAPIError:
            return False
        return True

    async def _login(self, cli: str) -> None:
        cfg = self.config
        if cfg.auth_key_file:
            key_arg = f"file:{cfg.auth_key_file}"  # never on the command line itself
        elif cfg.auth_key:
            keyf = cfg.state_dir / "authkey"
            keyf.write_text(cfg.auth_key)
            os.chmod(keyf, 0o600)
            key_arg = f"file:{keyf}"
        else:
            raise ChildUnavailable("tsnet node is not logged in: give --tsnet-auth-key-file or TS_AUTHKEY")
        argv = [cli, "--socket", str(self.socket), "up", "--auth-key", key_arg,
                "--hostname", cfg.hostname, "--accept-dns=false", "--accept-routes=false",
                "--timeout", f"{int(cfg.start_timeout)}s"]
        if cfg.control_url:
            argv += ["--login-server", cfg.control_url]
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        _, err = await proc.communicate()
        with contextlib.suppress(FileNotFoundError):
            (cfg.state_dir / "authkey").unlink()
        if proc.returncode != 0:
            lines = [ln for ln in err.decode(errors="replace").splitlines() if ln.strip()]
            raise ChildUnavailable(f"tsnet node could not join: {lines[-1] if lines else 'tailscale up failed'}")

    async def aclose(self) -> None:
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
