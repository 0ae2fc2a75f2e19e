"""JSON Lines files, read with errors that name the file and the line."""

import json
from pathlib import Path

from utils.errors import CodeUpError


def read_jsonl(path, missing: str = "file not found") -> list[tuple[int, object]]:
    """(line number, value) for every non-blank line; a missing file or a bad line is a CodeUpError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CodeUpError(f"{missing}: {path}")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append((number, json.loads(line)))
            except json.JSONDecodeError as error:
                raise CodeUpError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    return rows
