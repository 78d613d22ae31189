"""`python -m serve.cli`: the `crosstask` command (tests and benchmarks start servers so)."""

import sys

from serve.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
