"""Coverage-guided fuzzing (atheris/libFuzzer) of the parsers in tests/fuzz_targets.py.

    python scripts/fuzz.py --all 60          # every target, 60 s each (what `make fuzz` runs)
    python scripts/fuzz.py openai_chat -runs=100000

Working corpora grow in .fuzz/<target>/ (not committed); the saved regression inputs in
tests/fuzz_corpus/<target>/ seed each run, and any crash is written there (crash-<sha1>), so
tests/test_fuzz.py replays it on every test run from then on. Prints one summary line per
target: inputs tried, corpus size, crashes.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"


def fuzz_one(target: str, argv: list[str]) -> None:
    import atheris

    sys.path.insert(0, str(TESTS))
    with atheris.instrument_imports(include=["lmlink"]):
        import fuzz_targets
    fn, expected = fuzz_targets.TARGETS[target]

    def one(data: bytes) -> None:
        try:
            fn(data)
        except expected:
            pass

    work = ROOT / ".fuzz" / target
    seeds = TESTS / "fuzz_corpus" / target
    work.mkdir(parents=True, exist_ok=True)
    seeds.mkdir(parents=True, exist_ok=True)
    args = [sys.argv[0], *argv, f"-artifact_prefix={seeds}/", str(work), str(seeds)]
    atheris.Setup(args, one)
    atheris.Fuzz()


def fuzz_all(seconds: int) -> int:
    sys.path.insert(0, str(TESTS))
    import fuzz_targets

    failed = 0
    for target in fuzz_targets.TARGETS:
        res = subprocess.run(
            [sys.executable, __file__, target, f"-max_total_time={seconds}", "-rss_limit_mb=4096",
             "-timeout=10", "-print_final_stats=1"],
            capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        runs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", res.stderr)
        corpus = len(list((ROOT / ".fuzz" / target).iterdir()))
        crashes = [p.name for p in (TESTS / "fuzz_corpus" / target).glob("crash-*")]
        crashed = res.returncode != 0
        failed += crashed
        print(f"{target}: {runs[-1] if runs else '?'} inputs in {seconds} s, corpus {corpus}, "
              f"{'CRASH ' + res.stderr.strip().splitlines()[-1] if crashed else 'no crash'}"
              f"{' (saved: ' + ', '.join(crashes) + ')' if crashes else ''}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--all":
        sys.exit(fuzz_all(int(sys.argv[2])))
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    fuzz_one(sys.argv[1], sys.argv[2:])
