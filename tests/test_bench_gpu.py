"""bench/bench_gpu.py with tiny configs of the same model families, on a CPU."""

import pytest
import torch


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


@pytest.mark.slow
def test_mixed_lengths_run_every_trainer_and_count_real_tokens(tmp_path):
    import bench_gpu

    output = tmp_path / "table.md"
    bench_gpu.main(["--tiny", "--steps", "2", "--models", "Qwen2.5-Coder-7B", "--bits", "4", "--checkpointing", "off",
                    "--min_length", "8", "--trainers", "finetune.py,finetune.py-per-example,TRL", "--output", str(output)])
    text = output.read_text()
    assert "micro-batch 4 x 8-32 tokens" in text
    rows = [line for line in text.splitlines() if line.startswith("| Qwen")]
    assert [row.split("|")[4].strip() for row in rows] == ["finetune.py", "finetune.py-per-example", "TRL"]
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert float(cells[5]) > 0 and cells[6] == "", row


def test_mixed_length_rows_and_the_token_count_leave_out_padding():
    import bench_gpu

    rows = bench_gpu.token_rows(1000, count=50, length=40, min_length=10)
    lengths = [len(row["input_ids"]) for row in rows]
    assert min(lengths) >= 10 and max(lengths) <= 40 and len(set(lengths)) > 10
    assert all(len(row["labels"]) == len(row["attention_mask"]) == len(row["input_ids"]) for row in rows)
    assert {len(row["input_ids"]) for row in bench_gpu.token_rows(1000, count=5, length=40)} == {40}

    clock = bench_gpu.StepClock()
    model = torch.nn.Module().train()
    clock.on_step_begin(None, None, None)
    clock.count(model, (), {"input_ids": torch.ones(2, 6), "attention_mask": torch.tensor([[1] * 6, [1] * 4 + [0] * 2])})
    clock.count(model, (), {"input_ids": torch.ones(1, 7)})  # a packed row: no padding
    clock.count(model.eval(), (), {"input_ids": torch.ones(1, 100)})  # evaluation is not training
    clock.on_step_end(None, None, None)
    assert clock.tokens == [10 + 7]
