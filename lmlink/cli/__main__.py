"""`python -m lmlink.cli ...` (the tests run the command line this way)."""

import sys

from lmlink.cli import main

sys.exit(main())
