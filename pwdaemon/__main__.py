"""`python -m pwdaemon`: the same command line as the `pwdaemon` script."""

from __future__ import annotations

import sys

from pwdaemon.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
