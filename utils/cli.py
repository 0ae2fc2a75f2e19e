"""The one entry point every stage script uses: a fire CLI that reports user errors in one line."""

import os
import sys
import traceback

from utils.errors import CodeUpError


def run_cli(component, argv: list[str] | None = None) -> None:
    """Run `component` (a function) as a fire CLI on sys.argv (or `argv`); a CodeUpError becomes
    `error: ...` and exit code 2. With CODEUP_DEBUG=1 the traceback behind the error (and its
    cause) is printed first."""
    import fire  # here, so that importing a stage as a library (benchmarks, tests) needs no fire

    # Piped to a file or `tee`, Python holds stdout back in blocks: the log would show nothing for
    # minutes (a training run's loss lines), then everything, out of order with stderr's notices.
    sys.stdout.reconfigure(line_buffering=True)
    try:
        fire.Fire(component, command=argv)
    except CodeUpError as error:
        if os.environ.get("CODEUP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        message = " ".join(str(error).split("\n"))  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
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
