"""`python -m kvtier`: the same command line as the `kvtier` script."""

from __future__ import annotations

from kvtier.cli import main

if __name__ == "__main__":
    main(prog_name="kvtier")
