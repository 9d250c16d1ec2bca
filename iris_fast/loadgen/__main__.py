"""``python -m iris_fast.loadgen ...``: ``iris-fast load`` without the ``iris-fast`` wrapper."""

import argparse
import sys

from iris_fast.loadgen.cli import add_parser, run


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` as the options of ``iris-fast load`` and run it."""
    parser = argparse.ArgumentParser(prog="python -m iris_fast.loadgen")
    sub = parser.add_subparsers(dest="command")
    add_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Accept both ``python -m iris_fast.loadgen load --rate 5`` and ``... --rate 5``.
    if not argv or argv[0] != "load":
        argv.insert(0, "load")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
