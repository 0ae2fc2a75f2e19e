"""The one reader of every file a stage reads (data, prompts, samples, problems, templates, adapter
configs): whatever is wrong with the file (missing, a folder, unreadable, not UTF-8 text, truncated
or invalid JSON) becomes one CodeUpError that names the file, and the line where there is one."""

import json
from pathlib import Path

from utils.errors import CodeUpError


def read_text(path, *, what: str = "file") -> str:
    """The file's text (UTF-8; a leading byte-order mark is dropped)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CodeUpError(f"{what} {path} is a folder, not a file")
    if not path.exists():
        raise CodeUpError(f"{what} not found: {path}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise CodeUpError(f"cannot read {what} {path}: {error.strerror or error}") from error
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise CodeUpError(
            f"{path} line {line}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start}); "
            f"is it a binary file, or text in another encoding? Convert it to UTF-8"
        ) from error


def read_json(path, *, what: str = "file"):
    """The JSON value in the file."""
    text = read_text(path, what=what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        # The parser stopped at the end of the text, or in a string that never closes: cut short.
        cut_short = error.pos >= len(text.rstrip()) or (
            error.msg.startswith("Unterminated string") and '"' not in text[error.pos + 1:]
        )
        ending = " (the file ends early: is it truncated?)" if cut_short else ""
        raise CodeUpError(
            f"{Path(path).expanduser()} line {error.lineno} column {error.colno}: not valid JSON ({error.msg}){ending}"
        ) from error


def read_jsonl(path, *, what: str = "file") -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line of a JSON Lines file."""
    rows = []
    for number, line in enumerate(read_text(path, what=what).splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise CodeUpError(f"{Path(path).expanduser()} line {number}: not valid JSON ({error.msg})") from error
    return rows
