"""The one entry point every stage script uses: a fire CLI that reports user errors in one line."""

import os
import sys
import traceback

from utils.errors import CodeUpError


def run_cli(component, argv: list[str] | None = None, *, aliases: dict[str, str] | None = None) -> None:
    """Run `component` (a function) as a fire CLI on sys.argv (or `argv`); a CodeUpError becomes
    `error: ...` and exit code 2. With CODEUP_DEBUG=1 the traceback behind the error (and its
    cause) is printed first. `aliases`: old flag name -> today's (see renamed_flags), named once in
    --help."""
    import fire  # here, so that importing a stage as a library (benchmarks, tests) needs no fire

    # Piped to a file or `tee`, Python holds stdout back in blocks: the log would show nothing for
    # minutes (a training run's loss lines), then everything, out of order with stderr's notices.
    sys.stdout.reconfigure(line_buffering=True)
    if getattr(component, "__doc__", None):
        component.__doc__ = one_line_arg_descriptions(component.__doc__)
        if aliases:
            component.__doc__ = with_alias_note(component.__doc__, aliases)
    if aliases:
        argv = renamed_flags(sys.argv[1:] if argv is None else list(argv), aliases)
    try:
        fire.Fire(component, command=argv)
    except CodeUpError as error:
        if os.environ.get("CODEUP_DEBUG", "") not in ("", "0"):
            traceback.print_exc()
        message = " ".join(str(error).split("\n"))  # one line, whatever the message holds
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def renamed_flags(argv: list[str], aliases: dict[str, str]) -> list[str]:
    """argv with each old flag name (the 2023 scripts' spelling) replaced by today's: `aliases` maps
    an old name to a new one, or to `new=value` where the old flag was a switch that is now a value
    of the new one (`--only_benchmarks` is `--benchmarks only`)."""
    result, index = [], 0
    while index < len(argv):
        token = argv[index]
        index += 1
        name, equals, value = token.removeprefix("--").partition("=")
        old = name.replace("-", "_")
        if not token.startswith("--") or old not in aliases:
            result.append(token)
            continue
        new, fixed, fixed_value = aliases[old].partition("=")
        if not fixed:
            result.append(f"--{new}{equals}{value}")
            continue
        if not equals and index < len(argv) and argv[index] in SWITCH_WORDS:  # `--old True`
            value, index = argv[index], index + 1
        if not value or value in SWITCH_WORDS[:2]:  # on: the fixed value; off: as if not given
            result.append(f"--{new}={fixed_value}")
    return result


SWITCH_WORDS = ("True", "true", "False", "false")


def with_alias_note(docstring: str, aliases: dict[str, str]) -> str:
    """The docstring with one line, before its Args, naming the old flag names that still work."""
    names = ", ".join(f"--{old} (now --{new.replace('=', ' ')})" for old, new in aliases.items())
    note = f"Old flag names still work: {names}."
    head, args, tail = docstring.partition("\n    Args:")
    return f"{head.rstrip()}\n\n    {note}\n{args}{tail}" if args else f"{docstring.rstrip()}\n\n{note}\n"


def one_line_arg_descriptions(docstring: str) -> str:
    """The docstring with each entry of its `Args:` section on one line. fire's parser (0.7) keeps
    only the text before the first colon of a continuation line, and reads `word (x:` as another
    argument, so `--help` showed "(default" for "(default: ...)" and lost the rest of the entry."""
    lines, section_indent, entry_indent = [], None, None
    for line in docstring.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() == "Args:":
            section_indent, entry_indent = indent, None
        elif section_indent is not None and line.strip():
            if indent <= section_indent:  # the next section, or the end of the docstring
                section_indent = None
            elif entry_indent is None or indent <= entry_indent:  # an argument's first line
                entry_indent = indent
            elif lines[-1].strip():  # a continuation: onto its entry's line
                lines[-1] = f"{lines[-1].rstrip()} {line.strip()}"
                continue
        lines.append(line)
    return "\n".join(lines)


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


def resolve_api_key(*, api_key, api_key_file, environment_variable: str) -> str | None:
    """A key for an API (generate.py's server, evaluate.py's client): from --api_key_file (one
    line), else --api_key (which `ps` shows to every user of the machine: a warning), else the
    environment variable; None: no key. Both flags at once, or an unreadable or empty file: an error."""
    from pathlib import Path

    from utils.logs import logger

    given = api_key not in (None, "")
    if api_key_file:
        if given:
            raise CodeUpError("--api_key and --api_key_file: give one of them")
        path = Path(str(api_key_file)).expanduser()
        try:
            lines = path.read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise CodeUpError(f"--api_key_file {path}: cannot read it ({getattr(error, 'strerror', None) or error})") from error
        if len(lines) != 1 or not lines[0].strip():
            raise CodeUpError(f"--api_key_file {path}: expected one line holding the key")
        if path.stat().st_mode & 0o077:
            logger.warning(f"--api_key_file {path}: other users of this machine can read it (chmod 600 {path})")
        return lines[0].strip()
    if given:
        logger.warning("--api_key on the command line: every user of this machine can read it (ps); "
                       f"prefer --api_key_file or the {environment_variable} environment variable")
        return str(api_key)
    return os.environ.get(environment_variable) or None
