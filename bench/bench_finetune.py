"""Training speed and memory: finetune.py against TRL's SFTTrainer, same model, data and settings.

    .venv/bin/python bench/bench_finetune.py [--steps 6] [--rounds 2] [--records 256]

Each run is a separate process (so peak memory is its own), and the two trainers alternate
(ours, TRL, ours, TRL, ...) so that drift in the machine's speed hits both alike. Both train
SmolLM2-135M (or --base_model) with LoRA r=8 on q_proj,v_proj, micro-batches of 4, gradient
accumulation to 16, cutoff 512, the same precision (auto: bf16 on CPUs with native bf16), on the
first --records records of Code Alpaca; TRL keeps its own defaults otherwise. Reported:
  - tokens/s: real (non-pad) tokens fed to the model during trainer.train(), divided by its time;
  - peak RSS of the process (and peak GPU memory on CUDA);
  - achieved FLOP/s = 4 x parameters x tokens / time (forward + input gradients; the frozen base
    needs no weight gradients), as a share of the bf16 (or fp32) matmul peak measured in this run.
Prints a Markdown table for bench/RESULTS.md.
"""

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402
from machine import cpu_name  # noqa: E402

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])
SETTINGS = dict(micro_batch_size=4, batch_size=16, cutoff_len=512, learning_rate=3e-4)


class TokenCounter:
    """Counts the real tokens of every forward pass during training (packed rows have no padding;
    padded batches count their attention mask)."""

    def __init__(self, model):
        self.tokens = 0
        model.register_forward_pre_hook(self.count, with_kwargs=True)

    def count(self, module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            ids = kwargs.get("input_ids", args[0] if args else None)
            self.tokens += int(mask.sum()) if mask is not None and mask.dim() == 2 else ids.numel()


def run_ours(base_model, data_file, output_dir, steps):
    import finetune

    started = {}

    class Clock(finetune.transformers.TrainerCallback):
        def on_train_begin(self, *args, **kwargs):
            started["train"] = time.perf_counter()

    original = finetune.build_trainer

    def build_with_probe(*args, **kwargs):
        trainer = original(*args, **kwargs)
        trainer.add_callback(Clock())
        started["counter"] = TokenCounter(trainer.model)
        return trainer

    finetune.build_trainer = build_with_probe
    trainer = finetune.train(
        base_model=base_model, data_path=data_file, output_dir=output_dir, max_steps=steps, warmup_steps=0,
        val_set_size=0, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
        lora_target_modules=LORA["target_modules"], save_steps=10_000, logging_steps=1, **SETTINGS,
    )
    seconds = time.perf_counter() - started["train"]
    return trainer.model, started["counter"].tokens, seconds


def run_trl(base_model, data_file, output_dir, steps):
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    import finetune
    from utils.model_loading import load_model_and_tokenizer
    from utils.prompter import Prompter

    prompter = Prompter()
    records = load_dataset("json", data_files=data_file, split="train")
    dataset = records.map(lambda r: {"prompt": prompter.generate_prompt(r["instruction"], r["input"]),
                                     "completion": r["output"]}, remove_columns=records.column_names)
    dtype, precision = finetune.resolve_precision("auto", torch.cuda.is_available())
    model, tokenizer = load_model_and_tokenizer(base_model, dtype=dtype)
    config = SFTConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=SETTINGS["micro_batch_size"],
        gradient_accumulation_steps=SETTINGS["batch_size"] // SETTINGS["micro_batch_size"],
        learning_rate=SETTINGS["learning_rate"], max_length=SETTINGS["cutoff_len"], bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(), report_to="none", save_strategy="no", logging_steps=1,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", bias="none", **LORA))
    counter = TokenCounter(trainer.model)
    started = time.perf_counter()
    trainer.train()
    return trainer.model, counter.tokens, time.perf_counter() - started


def child(which: str, base_model: str, data_file: str, output_dir: str, steps: int):
    """One training run; prints its measurements as JSON on the last line."""
    import torch

    model, tokens, seconds = (run_ours if which == "ours" else run_trl)(base_model, data_file, output_dir, steps)
    parameters = sum(p.numel() for p in model.parameters())
    result = {
        "which": which, "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "flops_per_second": 4 * parameters * tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }
    print(json.dumps(result))


def matmul_peak(dtype_name: str, size: int = 2048, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul in this process: the machine's practical peak."""
    import torch

    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    a @ b  # warm-up
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        count += 1
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * size**3 * count / (time.perf_counter() - started)


def main(
    base_model: str = "smollm2-135m",
    data_file: str = str(ROOT.parent / "shared" / "data" / "code_alpaca_20k.json"),
    records: int = 256,
    steps: int = 6,
    rounds: int = 2,
    work_dir: str = "/tmp/codeup-bench-finetune",
    child_run: str = "",
):
    """Alternate finetune.py and TRL's SFTTrainer `rounds` times each and print the comparison."""
    if child_run:
        return child(child_run, base_model, data_file, work_dir, steps)

    import torch

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    data = json.loads(Path(data_file).read_text())[:records]
    sliced = work / "records.json"
    sliced.write_text(json.dumps(data))
    import finetune

    _, precision = finetune.resolve_precision("auto", torch.cuda.is_available())
    peak = matmul_peak({"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision])

    results = {"ours": [], "trl": []}
    for round_number in range(rounds):
        for which in ("ours", "trl"):
            command = [sys.executable, __file__, "--child_run", which, "--base_model", base_model,
                       "--data_file", str(sliced), "--work_dir", str(work / f"{which}-{round_number}"),
                       "--steps", str(steps)]
            done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
            if done.returncode != 0:
                sys.exit(f"{which} failed:\n{done.stderr[-4000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            results[which].append(result)
            print(f"round {round_number + 1} {which}: {result['tokens_per_second']:.0f} tokens/s, "
                  f"peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr)

    def median(which, key):
        values = [r[key] for r in results[which] if r[key] is not None]
        return statistics.median(values) if values else None

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}; precision {precision}; "
          f"matmul peak {peak / 1e9:.0f} GFLOP/s ({precision}, 2048x2048)")
    print(f"model {base_model}, {records} Code Alpaca records, {steps} steps of 16 examples, {rounds} alternating rounds (medians)")
    print()
    print("| trainer | tokens/s | peak RSS (MB) | peak GPU (MB) | FLOP/s share of matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for which, name in (("ours", "finetune.py (packing on, its defaults)"), ("trl", "TRL SFTTrainer (its defaults)")):
        gpu = median(which, "peak_gpu_mb")
        print(f"| {name} | {median(which, 'tokens_per_second'):.0f} | {median(which, 'peak_rss_mb'):.0f} | "
              f"{'-' if gpu is None else f'{gpu:.0f}'} | {median(which, 'flops_per_second') / peak:.0%} |")
    print()
    print(f"speed-up: {median('ours', 'tokens_per_second') / median('trl', 'tokens_per_second'):.2f}x TRL's tokens/s; "
          f"memory: {median('ours', 'peak_rss_mb') / median('trl', 'peak_rss_mb'):.2f}x TRL's peak RSS")


if __name__ == "__main__":
    fire.Fire(main)
