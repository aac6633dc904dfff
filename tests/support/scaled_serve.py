"""`lmlink serve` with a shorter quota "minute", so tests can show recovery after the window.

Usage: python tests/support/scaled_serve.py MINUTE_SECONDS serve [lmlink serve flags...]
Everything else is the real command line (`lmlink.cli.main`); only the length of the
tokens-per-minute window changes (buckets scale with it).
"""

from __future__ import annotations

import sys

from lmlink.access import quotas

if __name__ == "__main__":
    quotas.WINDOWS["minute"] = quotas.Window("minute", float(sys.argv[1]))
    from lmlink.cli import main

    sys.exit(main(sys.argv[2:]))
