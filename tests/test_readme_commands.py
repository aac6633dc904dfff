"""The README's `lmlink` commands, run as written.

Every line of a fenced block that starts with `lmlink` (or `.venv/bin/lmlink`) is one of:
- a synopsis (has `[...]`, `A | B` or CAPITAL placeholders): every `--flag` it names must be
  in that command's `--help`;
- an example: it must parse; if it is safe against a local test server (chat, models list,
  status, share/token/usage on a scratch state dir, link prefer/prefs, enroll, cluster check of
  an all-local cluster file) it is run as written and must exit as the README says: 0, or the
  code in a trailing `# exit N` comment. Servers, links, cluster launches and discovery
  (which would send mDNS on the LAN) are parsed only; other tests run them.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, lmlink_cmd

README = REPO / "README.md"
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]{2,}\b|HOST:PORT")
EXIT = re.compile(r"^\s*#?\s*exit\s+(\d+)")
ALL_LOCAL = {"cluster/local-2-mpi.toml", "cluster/local-2-ring.toml"}


@dataclass(frozen=True)
class Command:
    line: int
    text: str  # without the `lmlink` word and the trailing comment
    comment: str

    @property
    def argv(self) -> list[str]:
        return shlex.split(self.text)

    @property
    def expected_exit(self) -> int:
        m = EXIT.search(self.comment)
        return int(m.group(1)) if m else 0

    @property
    def synopsis(self) -> bool:
        return bool(re.search(r"\[|\s\|\s", self.text) or PLACEHOLDER.search(self.text))


def readme_commands(text: str) -> list[Command]:
    out: list[Command] = []
    fenced, pending, start = False, "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        if raw.startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            continue
        line = raw.strip()
        if pending:
            line, pending = pending + " " + line, ""
        elif not re.match(r"(\.venv/bin/)?lmlink\s", line):
            continue
        else:
            start = n
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        body, _, comment = line.partition("  #")
        body = re.sub(r"^(\.venv/bin/)?lmlink\s+", "", body.strip())
        for part in re.split(r"\s\|\s+lmlink\s+", body):  # `lmlink a | lmlink b` synopses
            out.append(Command(start, part.strip(), comment))
    return out


COMMANDS = readme_commands(README.read_text())


def _help_path(argv: list[str]) -> list[str]:
    """`share add ...` -> ["share", "add"]: the words before the first option or value."""
    from lmlink.cli import build_parser

    parser, path = build_parser(), []
    for word in argv:
        sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
        if sub is None or word not in sub.choices:
            break
        parser, path = sub.choices[word], [*path, word]
    return path


def test_the_readme_has_commands_to_walk():
    kinds = {c.synopsis for c in COMMANDS}
    assert len(COMMANDS) >= 20 and kinds == {True, False}, COMMANDS


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.synopsis],
                         ids=lambda c: f"L{c.line}")
def test_synopsis_flags_exist(cmd: Command):
    path = _help_path(cmd.text.replace("[", " ").replace("]", " ").split())
    result = subprocess.run(lmlink_cmd(*path, "--help"), capture_output=True, text=True,
                            timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    for flag in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cmd.text)):
        assert flag in result.stdout, f"README line {cmd.line}: {flag} is not an option of " \
                                      f"`lmlink {' '.join(path)}`"


def _safe(argv: list[str]) -> bool:
    head = argv[0]
    if head in ("chat", "status", "share", "token", "usage", "enroll"):
        return True
    if head == "models":
        names = [w for w in argv[1:] if not w.startswith("-")]
        return names in ([], ["list"], ["load"], ["unload"])  # never changes the test server
    if head == "link":
        return len(argv) > 1 and argv[1] in ("prefer", "prefs")
    if head == "cluster":
        return argv[1] == "check" and argv[2] in ALL_LOCAL
    return False  # serve, link, cluster up, discover: long-running or off-machine traffic


EXAMPLES = [c for c in COMMANDS if not c.synopsis]


@pytest.mark.parametrize("cmd", EXAMPLES, ids=lambda c: f"L{c.line}:{c.argv[0]}")
def test_example_parses(cmd: Command):
    from lmlink.cli import build_parser

    try:
        build_parser().parse_args(cmd.argv)
    except SystemExit as exc:
        if cmd.expected_exit == 2 and exc.code == 2:
            return  # a usage error shown as one: refused by the parser itself
        pytest.fail(f"README line {cmd.line}: `lmlink {cmd.text}` does not parse ({exc.code})")
    if cmd.expected_exit == 2:  # refused after parsing: only a run can show it
        assert _safe(cmd.argv), f"README line {cmd.line}: cannot check `# exit 2` here"


@pytest.mark.parametrize("cmd", [c for c in EXAMPLES if _safe(c.argv)],
                         ids=lambda c: f"L{c.line}:{c.argv[0]}")
def test_example_runs_as_the_readme_says(cmd: Command, server, tmp_path: Path):
    env = {**os.environ, "LMLINK_SERVER": server.address,
           "LMLINK_STATE_DIR": str(tmp_path / "state"), "LMLINK_CONFIG_DIR": str(tmp_path / "cfg")}
    result = subprocess.run(lmlink_cmd(*cmd.argv), capture_output=True, text=True, timeout=120,
                            env=env, cwd=tmp_path, input="")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == cmd.expected_exit, (
        f"README line {cmd.line}: `lmlink {cmd.text}` exited {result.returncode}, "
        f"README says {cmd.expected_exit}: {result.stderr.strip()}")
    if cmd.expected_exit:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
