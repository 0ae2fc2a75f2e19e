"""Download the instruction data into data/ (for users with internet; the files are CC BY-NC 4.0).

    python data/download.py                      # both files, into data/
    python data/download.py --output_dir ~/codeup-data
    python data/download.py --base_url http://mirror.example/codeup/   # both files from one mirror

A file already present and valid is kept. Each download goes to a temp file, is checked (a JSON
list of records with instruction and output) and only then renamed into place.
"""

import json
import os
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tqdm.auto import tqdm  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.errors import CodeUpError  # noqa: E402

SOURCES = {
    # Code Alpaca's 20K records, from its public repository.
    "code_alpaca_20k.json": "https://raw.githubusercontent.com/sahil280114/codealpaca/master/data/code_alpaca_20k.json",
    # The 4.5K records CodeUp added, from CodeUp's repository.
    "new_codealpaca.json": "https://raw.githubusercontent.com/juyongjiang/CodeUp/master/data/new_codealpaca.json",
}


def is_valid(path: Path) -> bool:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(records, list) and bool(records) and all(
        isinstance(r, dict) and "instruction" in r and "output" in r for r in records)


def fetch(url: str, target: Path, timeout: float) -> None:
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not is_valid(Path(temp)):
            raise CodeUpError(f"{url} did not give a JSON list of instruction records")
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except OSError as error:
        raise CodeUpError(f"cannot download {url}: {error}") from None
    finally:
        if os.path.exists(temp):
            os.remove(temp)


def main(output_dir: str = "data/", base_url: str = "", overwrite: bool = False, timeout: float = 60.0):
    """Download code_alpaca_20k.json and new_codealpaca.json.

    Args:
        output_dir: where the files go (data/ is where the other stages look).
        base_url: fetch both files from this folder URL instead of their repositories.
        overwrite: download again even when a valid file is present.
        timeout: seconds to wait for the server.
    """
    folder = Path(output_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    for name, url in SOURCES.items():
        target = folder / name
        if target.is_file() and is_valid(target) and not overwrite:
            print(f"{target} is already here and valid: kept")
            continue
        source = base_url.rstrip("/") + "/" + name if base_url else url
        fetch(source, target, timeout)
        print(f"Downloaded {target} ({len(json.loads(target.read_text(encoding='utf-8'))):,} records)")


if __name__ == "__main__":
    run_cli(main)
