"""data/download.py --benchmarks: HumanEval-X (gzipped JSONL) and MultiPL-E (parquet) from a loopback
mirror, converted to the JSONL evaluate.py reads, checked, kept when valid, never half-written."""

import functools
import gzip
import http.server
import json
import subprocess
import sys
import threading

import pyarrow
import pyarrow.parquet as parquet

from conftest import ROOT

HUMANEVALX_ROW = {"task_id": "CPP/0", "prompt": "int f(){\n", "declaration": "int f(){\n",
                  "canonical_solution": "    return 1;\n}\n", "test": "int main(){}\n", "example_test": ""}
MULTIPLE_ROW = {"name": "HumanEval_0_f", "language": "js", "prompt": "function f(){\n", "doctests": "transform",
                "original": "x.py", "prompt_terminology": "reworded", "tests": "f();\n", "stop_tokens": ["\nfunction "]}


def serve(folder):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def test_benchmarks_are_fetched_converted_checked_and_kept(tmp_path):
    served = tmp_path / "served"
    (served / "humaneval-x").mkdir(parents=True)
    (served / "multipl-e").mkdir()
    for language in ["python", "cpp", "java", "js", "go", "rust"]:
        (served / "humaneval-x" / f"humaneval_{language}.jsonl.gz").write_bytes(
            gzip.compress((json.dumps(HUMANEVALX_ROW) + "\n").encode()))
    for language in ["js", "java", "cpp", "rs", "sh", "pl", "go", "php"]:
        parquet.write_table(pyarrow.Table.from_pylist([MULTIPLE_ROW, dict(MULTIPLE_ROW, name="HumanEval_1_g")]),
                            served / "multipl-e" / f"humaneval-{language}.parquet")
    server, url = serve(served)
    download = lambda: subprocess.run([sys.executable, "data/download.py", "--output_dir", tmp_path / "data",
                                       "--base_url", url, "--only_benchmarks"],
                                      cwd=ROOT, capture_output=True, text=True, timeout=120)
    try:
        result = download()
        assert result.returncode == 0, result.stderr[-3000:]
        rows = [json.loads(line) for line in (tmp_path / "data" / "humaneval-x" / "humaneval_cpp.jsonl").open()]
        assert rows == [HUMANEVALX_ROW]
        rows = [json.loads(line) for line in (tmp_path / "data" / "multipl-e" / "humaneval-rs-reworded.jsonl").open()]
        assert [row["name"] for row in rows] == ["HumanEval_0_f", "HumanEval_1_g"] and rows[0]["stop_tokens"] == ["\nfunction "]
        assert not (tmp_path / "data" / "code_alpaca_20k.json").exists()  # only the benchmarks
        assert download().stdout.count("already here and valid: kept") == 14

        # A server that answers with a web page instead of data: one error line, nothing written.
        (served / "multipl-e" / "humaneval-php.parquet").write_text("<html>not data</html>")
        (tmp_path / "data" / "multipl-e" / "humaneval-php-reworded.jsonl").unlink()
        result = download()
        assert result.returncode == 2 and result.stderr.startswith("error: ") and "humaneval-php.parquet" in result.stderr
        assert not (tmp_path / "data" / "multipl-e" / "humaneval-php-reworded.jsonl").exists()
        assert not [p for p in (tmp_path / "data" / "multipl-e").iterdir() if p.name.startswith(".")]
    finally:
        server.shutdown()
