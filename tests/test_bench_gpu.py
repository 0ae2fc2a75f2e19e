"""bench/bench_gpu.py with tiny configs of the same model families, on a CPU."""

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_gpu_benchmark_runs_on_a_cpu_with_tiny_configs(tmp_path, capsys):
    import bench_gpu

    output = tmp_path / "table.md"
    bench_gpu.main(["--tiny", "--steps", "2", "--output", str(output)])
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ") and "---" not in line][1:]
    # 2 models x 2 bases x checkpointing off/on x 2 trainers, each with a speed and no failure
    assert len(rows) == 16, rows
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[5]) > 0 and cells[6] == "", row
    printed = capsys.readouterr().out.splitlines()
    assert all(line in printed for line in output.read_text().splitlines())  # the same table on stdout


def test_model_configs_are_the_published_shapes():
    import bench_gpu

    llama = bench_gpu.model_config("Llama-2-7B", tiny=False)
    qwen = bench_gpu.model_config("Qwen2.5-Coder-7B", tiny=False)
    assert (llama.hidden_size, llama.num_hidden_layers, llama.vocab_size) == (4096, 32, 32000)
    assert (qwen.hidden_size, qwen.num_key_value_heads, qwen.vocab_size) == (3584, 4, 152064)
