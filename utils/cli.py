"""The one entry point every stage script uses: a fire CLI that reports user errors in one line."""

import sys

from utils.errors import CodeUpError


def run_cli(component) -> None:
    """Run `component` (a function) as a fire CLI; a CodeUpError becomes `error: ...` and exit code 2."""
    import fire  # here, so that importing a stage as a library (benchmarks, tests) needs no fire

    try:
        fire.Fire(component)
    except CodeUpError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def parse_list(value) -> list[str]:
    """A list flag given as a list (fire parses `[a,b]` of simple words), or a string:
    `a,b`, `[a,b]` or `['a', 'b']` (fire leaves paths and quoted lists as strings)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = value
    else:
        items = str(value).strip().removeprefix("[").removesuffix("]").split(",")
    return [str(item).strip().strip("'\"").strip() for item in items if str(item).strip().strip("'\"").strip()]
