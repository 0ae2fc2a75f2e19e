"""Download the instruction data into data/ (for users with internet; the files are CC BY-NC 4.0),
and with --benchmarks the multilingual benchmarks evaluate.py scores (HumanEval-X, MultiPL-E).

    python data/download.py                      # both files, into data/
    python data/download.py --output_dir ~/codeup-data
    python data/download.py --base_url http://mirror.example/codeup/   # both files from one mirror
    python data/download.py --benchmarks         # also data/humaneval-x/ and data/multipl-e/

A file already present and valid is kept. Each download goes to a temp file, is checked (a JSON
list of records with instruction and output; a benchmark: its rows and their fields) and only then
renamed into place. HumanEval-X (Apache-2.0) comes gzipped from CodeGeeX's repository; MultiPL-E
(BSD-3-Clause, with a clause that forbids training on it: evaluation and decontamination only)
comes as parquet from the hub and is written as JSONL, the layout evaluate.py reads.
"""

import contextlib
import gzip
import io
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import utils.logs  # noqa: E402,F401  (first: in a log file, no progress bars)
from tqdm.auto import tqdm  # noqa: E402

from utils.cli import run_cli  # noqa: E402
from utils.errors import CodeUpError  # noqa: E402
from utils.files import replacing  # noqa: E402

SOURCES = {
    # Code Alpaca's 20K records, from its public repository.
    "code_alpaca_20k.json": "https://raw.githubusercontent.com/sahil280114/codealpaca/master/data/code_alpaca_20k.json",
    # The 4.5K records CodeUp added, from CodeUp's repository.
    "new_codealpaca.json": "https://raw.githubusercontent.com/juyongjiang/CodeUp/master/data/new_codealpaca.json",
}


# HumanEval-X: (language, its folder in CodeGeeX's repository); the rust set has no `example_test` rows.
HUMANEVALX_LANGUAGES = ["python", "cpp", "java", "js", "go", "rust"]
HUMANEVALX_URL = "https://raw.githubusercontent.com/THUDM/CodeGeeX/main/codegeex/benchmark/humaneval-x/{language}/data/humaneval_{language}.jsonl.gz"
MULTIPLE_LANGUAGES = ["js", "java", "cpp", "rs", "sh", "pl", "go", "php"]
# The hub's parquet of each language (the "reworded" prompts are MultiPL-E's default, humaneval-{lang}).
MULTIPLE_URL = "https://huggingface.co/datasets/nuprl/MultiPL-E/resolve/main/humaneval-{language}/test/0000.parquet"


def benchmark_files() -> list[dict]:
    """Each benchmark file: where it goes (relative to output_dir), its URL, its name on a mirror,
    how to turn the download into JSONL, and the fields every row must have."""
    files = [{"target": f"humaneval-x/humaneval_{lang}.jsonl", "url": HUMANEVALX_URL.format(language=lang),
              "mirror_name": f"humaneval-x/humaneval_{lang}.jsonl.gz", "convert": gunzip_jsonl,
              "fields": ("task_id", "prompt", "canonical_solution", "test")} for lang in HUMANEVALX_LANGUAGES]
    files += [{"target": f"multipl-e/humaneval-{lang}-reworded.jsonl", "url": MULTIPLE_URL.format(language=lang),
               "mirror_name": f"multipl-e/humaneval-{lang}.parquet", "convert": parquet_to_jsonl,
               "fields": ("name", "prompt", "tests", "stop_tokens")} for lang in MULTIPLE_LANGUAGES]
    return files


def gunzip_jsonl(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


def parquet_to_jsonl(data: bytes) -> bytes:
    import pyarrow.parquet as parquet

    rows = parquet.read_table(io.BytesIO(data)).to_pylist()
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


def is_valid_benchmark(path: Path, *, fields) -> bool:
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return bool(rows) and all(isinstance(row, dict) and all(field in row for field in fields) for row in rows)


@contextlib.contextmanager
def downloading(url: str, *, target: Path):
    """utils/files.py's replacing (a temp file beside `target` for the block to fill; renamed onto
    `target` when the block succeeds, removed otherwise: never a half file), where a network or
    disk error names the URL."""
    try:
        with replacing(target) as temp:
            yield temp
    except OSError as error:
        raise CodeUpError(f"cannot download {url}: {error}") from error


def fetch_benchmark(url: str, *, target: Path, spec: dict, timeout: float) -> None:
    """Download, convert to JSONL, check the rows, then rename into place."""
    with downloading(url, target=target) as temp:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
        try:
            converted = spec["convert"](data)
        except Exception as error:  # a truncated gzip, an HTML page instead of parquet, ...
            raise CodeUpError(f"{url} did not give {spec['mirror_name'].split('.', 1)[1]} data: {error}") from error
        temp.write_bytes(converted)
        if not is_valid_benchmark(temp, fields=spec["fields"]):
            raise CodeUpError(f"{url} did not give rows with {', '.join(spec['fields'])}")


def download_benchmarks(folder: Path, *, base_url: str, overwrite: bool, timeout: float) -> None:
    for spec in benchmark_files():
        target = folder / spec["target"]
        if target.is_file() and is_valid_benchmark(target, fields=spec["fields"]) and not overwrite:
            print(f"{target} is already here and valid: kept")
            continue
        source = base_url.rstrip("/") + "/" + spec["mirror_name"] if base_url else spec["url"]
        fetch_benchmark(source, target=target, spec=spec, timeout=timeout)
        rows = sum(1 for line in target.read_text(encoding="utf-8").splitlines() if line.strip())
        print(f"Downloaded {target} ({rows} problems)")


def is_valid(path: Path) -> bool:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(records, list) and bool(records) and all(
        isinstance(r, dict) and "instruction" in r and "output" in r for r in records)


def fetch(url: str, *, target: Path, timeout: float) -> None:
    with downloading(url, target=target) as temp:
        with temp.open("wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=target.name) as bar:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    bar.update(len(chunk))
        if not is_valid(temp):
            raise CodeUpError(f"{url} did not give a JSON list of instruction records")


def main(output_dir: str = "data/", base_url: str = "", overwrite: bool = False, timeout: float = 60.0,
         benchmarks: bool | str = False):
    """Download code_alpaca_20k.json and new_codealpaca.json (and, asked, HumanEval-X and MultiPL-E).

    Args:
        output_dir: where the files go (data/ is where the other stages look).
        base_url: fetch every file from this folder URL instead of their homes (benchmarks as
            humaneval-x/humaneval_{lang}.jsonl.gz and multipl-e/humaneval-{lang}.parquet under it).
        overwrite: download again even when a valid file is present.
        timeout: seconds to wait for the server.
        benchmarks: True: also fetch HumanEval-X (humaneval-x/) and MultiPL-E (multipl-e/) for
            evaluate.py; only: fetch only them; False: only the training data.
    """
    if benchmarks not in (True, False, "only"):
        raise CodeUpError(f"--benchmarks takes True, False or only, not {benchmarks!r}")
    folder = Path(output_dir).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    if benchmarks:
        download_benchmarks(folder, base_url=base_url, overwrite=overwrite, timeout=timeout)
    if benchmarks == "only":
        return
    for name, url in SOURCES.items():
        target = folder / name
        if target.is_file() and is_valid(target) and not overwrite:
            print(f"{target} is already here and valid: kept")
            continue
        source = base_url.rstrip("/") + "/" + name if base_url else url
        fetch(source, target=target, timeout=timeout)
        print(f"Downloaded {target} ({len(json.loads(target.read_text(encoding='utf-8'))):,} records)")


if __name__ == "__main__":
    run_cli(main, aliases={"only_benchmarks": "benchmarks=only"})
