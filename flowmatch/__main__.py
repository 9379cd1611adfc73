"""`python -m flowmatch ...` is the same as the `flowmatch` console script."""

from flowmatch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
