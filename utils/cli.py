"""The one entry point every stage script uses: a fire CLI that reports user errors in one line."""

import sys

import fire

from utils.errors import CodeUpError


def run_cli(component) -> None:
    """Run `component` (a function) as a fire CLI; a CodeUpError becomes `error: ...` and exit code 2."""
    try:
        fire.Fire(component)
    except CodeUpError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
