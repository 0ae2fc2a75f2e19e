"""The whole pipeline, as run_codeup_cpu.sh chains it, on the tiny model; and data/download.py."""

import functools
import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT


def run_main_job(tiny_llama_dir, work_dir, data_dir):
    env = {**os.environ, "BASE_MODEL": str(tiny_llama_dir), "WORK_DIR": str(work_dir), "DATA_DIR": str(data_dir),
           "MAX_STEPS": "2", "EVAL_LIMIT": "2", "SKIP_SETUP": "1", "PY": sys.executable}
    return subprocess.run(["bash", "run_codeup_cpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)


@pytest.mark.slow
def test_main_job_chains_every_stage_and_skips_what_is_done(tiny_llama_dir, tmp_path):
    work = tmp_path / "run"
    result = run_main_job(tiny_llama_dir, work, tmp_path / "no-data")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "using data/sample_codeup.json" in result.stdout
    report = json.loads((work / "data" / "report.json").read_text())
    assert report["inputs"] == {"data/sample_codeup.json": 160} and report["output"] == "codeup_138.json"
    assert report["dropped_by_reason"]["malformed"] == 1 and report["dropped_by_reason"]["unknown_language"] > 10
    state = json.loads((work / "lora" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (work / "export" / "hf_ckpt" / "config.json").is_file()
    assert list((work / "export" / "gguf").glob("ggml-model-f16.gguf"))
    results = json.loads((work / "eval" / "humaneval_results.json").read_text())
    assert results["problems"] == 2 and results["model"] == str(work / "export" / "hf_ckpt")
    assert "generate.py --base_model" in result.stdout and "http://127.0.0.1:7860" in result.stdout

    again = run_main_job(tiny_llama_dir, work, tmp_path / "no-data")
    assert again.returncode == 0, (again.stdout + again.stderr)[-4000:]
    assert again.stdout.count("skipped:") == 5  # data, finetune, hf, gguf, evaluate


def test_download_fetches_checks_and_keeps(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    records = [{"instruction": "Write a Python loop.", "input": "", "output": "for i in range(3): pass"}]
    for name in ("code_alpaca_20k.json", "new_codealpaca.json"):
        (served / name).write_text(json.dumps(records))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        download = lambda: subprocess.run([sys.executable, "data/download.py", "--output_dir", tmp_path / "data",
                                           "--base_url", url], cwd=ROOT, capture_output=True, text=True, timeout=120)
        result = download()
        assert result.returncode == 0, result.stderr[-3000:]
        assert json.loads((tmp_path / "data" / "code_alpaca_20k.json").read_text()) == records
        assert download().stdout.count("already here and valid: kept") == 2

        (served / "code_alpaca_20k.json").write_text("<html>not data</html>")
        (tmp_path / "data" / "code_alpaca_20k.json").unlink()
        result = download()
        assert result.returncode == 2 and "did not give a JSON list of instruction records" in result.stderr
        assert not (tmp_path / "data" / "code_alpaca_20k.json").exists()
        assert not list((tmp_path / "data").glob(".*"))  # no temp file left
    finally:
        server.shutdown()
