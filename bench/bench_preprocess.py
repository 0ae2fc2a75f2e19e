"""Data stage speed: the whole codeup run, and batched Guesslang against one call per record.

    .venv/bin/python bench/bench_preprocess.py [--data_dir ../shared/data]

Both Guesslang variants run in this process on the same texts (those the codeup rules need), so the
ratio compares like with like. Prints a Markdown table for bench/RESULTS.md.
"""

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "data"))

import fire  # noqa: E402
from machine import cpu_name  # noqa: E402

import preprocess  # noqa: E402
from language_detection import Guesslang  # noqa: E402


def main(data_dir: str = str(ROOT.parent / "shared" / "data"), batch_size: int = 64):
    paths = [Path(data_dir) / "code_alpaca_20k.json", Path(data_dir) / "new_codealpaca.json"]
    started = time.perf_counter()
    entries = [(str(p), i, r) for p in paths for i, r in enumerate(json.loads(p.read_text()))]
    guesser = Guesslang()
    load_seconds = time.perf_counter() - started
    kept, dropped, _, _ = preprocess.filter_records(entries, mode="codeup", guesser=guesser, batch_size=batch_size)
    run_seconds = time.perf_counter() - started

    # The texts the codeup rules send to Guesslang: outputs and non-empty inputs of records whose
    # instruction names no language.
    unknown = [r for _, _, r in entries if preprocess.keyword_language(r["instruction"], strict=False) is None]
    texts = sorted({r["output"] for r in unknown} | {r["input"] for r in unknown if r["input"].strip()})
    started = time.perf_counter()
    batched = guesser.language_names(texts, batch_size=batch_size)
    batched_seconds = time.perf_counter() - started
    started = time.perf_counter()
    single = [guesser.language_names([text])[0] for text in texts]
    single_seconds = time.perf_counter() - started
    assert batched == single, "batched and single answers differ"

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"records: {len(entries):,}, kept {len(kept):,}, dropped {len(dropped):,}; Guesslang texts: {len(texts):,}")
    print()
    print("| measurement | seconds |")
    print("| --- | --- |")
    print(f"| whole codeup run (read, load Guesslang {load_seconds:.1f} s, filter; no writing) | {run_seconds:.1f} |")
    print(f"| Guesslang batched ({batch_size} texts a call) | {batched_seconds:.1f} |")
    print(f"| Guesslang one call per text | {single_seconds:.1f} |")
    print(f"| speed-up of batching | {single_seconds / batched_seconds:.1f}x |")


if __name__ == "__main__":
    fire.Fire(main)
