"""Files, one way each.

Reading: every file a stage reads (data, prompts, samples, problems, templates, adapter configs) goes
through read_text / read_json / read_jsonl / read_records: whatever is wrong with it (missing, a
folder, unreadable, not UTF-8 text, truncated or invalid JSON) becomes one CodeUpError that names
the file, and the line where there is one.
Writing: every output a stage writes appears whole or not at all (write_atomically, or `replacing`
for a file or folder another library fills): a killed run never leaves half a file that looks whole."""

import contextlib
import json
import os
import shutil
import tempfile
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


NOT_JSON = object()  # read_records(bad_lines="keep") yields this for a line that is not JSON


def read_records(path, *, what: str = "file", bad_lines: str = "error") -> list[tuple[str, object]]:
    """(where, record) for each record of a JSON list ("record N") or a JSON Lines file ("line N"),
    told apart by the text (a list starts with `[`). bad_lines="keep": a JSONL line that is not
    JSON is yielded as NOT_JSON for the caller to count, instead of an error."""
    text = read_text(path, what=what)
    if text.lstrip().startswith("["):
        records = read_json(path, what=what)
        return [(f"record {number}", record) for number, record in enumerate(records, start=1)]
    if not text.strip():
        return []
    if Path(path).suffix == ".json" and not text.lstrip().startswith("{"):
        read_json(path, what=what)  # not a list, not JSON Lines: the parser's own message
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as error:
                if bad_lines != "keep":
                    raise CodeUpError(f"{Path(path).expanduser()} line {number}: not valid JSON ({error.msg})") from error
                rows.append((f"line {number}", NOT_JSON))
    return rows


@contextlib.contextmanager
def replacing(target, *, folder: bool = False):
    """A temporary path beside `target` (a file, or with folder=True an empty folder) for the block
    to fill; moved onto `target` when the block succeeds (an existing folder is replaced), removed
    otherwise. Outputs are ordinary files (0644), not mkstemp's private ones."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        temp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    else:
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=target.suffix)
        os.close(handle)
        temp = Path(name)
    try:
        yield temp
        if folder:
            if target.exists():
                shutil.rmtree(target)
            temp.rename(target)
        else:
            os.chmod(temp, 0o644)
            os.replace(temp, target)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        elif temp.exists():
            temp.unlink()


def write_atomically(path, content: str | bytes) -> None:
    """Write a file whole or not at all (text as UTF-8)."""
    with replacing(path) as temp:
        if isinstance(content, bytes):
            temp.write_bytes(content)
        else:
            temp.write_text(content, encoding="utf-8")


def write_json(path, value) -> None:
    """JSON, indented, non-ASCII kept, written atomically."""
    write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n")
