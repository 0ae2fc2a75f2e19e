"""Merge memory and time: export_checkpoint.py against the naive merge, same model and adapter, one run.

    .venv/bin/python bench/bench_export.py [--hidden_size 2048 --layers 24]

Builds a Llama-shaped model with random weights (float16, 32,000-token vocabulary, about 1.3B
parameters by default, in 200 MB shards) and a LoRA adapter on q/k/v/o, then, each in its own
process (so that peak RSS is its own), alternating:
  - ours:  python export_checkpoint.py --checkpoint_type hf --max_shard_size 200MB (tensor by tensor);
  - naive: AutoModelForCausalLM.from_pretrained + PeftModel.from_pretrained + merge_and_unload +
           save_pretrained (the whole model in memory).
Prints a Markdown table for bench/RESULTS.md.
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import fire  # noqa: E402

NAIVE = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="200MB")
"""

BUILD = """
import sys, torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
sys.path.insert(0, sys.argv[4])
from utils.model_loading import resolve_model_reference
folder, adapter, hidden, layers = sys.argv[1], sys.argv[2], int(sys.argv[3].split(",")[0]), int(sys.argv[3].split(",")[1])
torch.manual_seed(0)
config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, tie_word_embeddings=False)
model = LlamaForCausalLM(config).to(torch.float16)
model.save_pretrained(folder, max_shard_size="200MB")
AutoTokenizer.from_pretrained(resolve_model_reference("smollm2-135m")).save_pretrained(folder)
peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
peft.save_pretrained(adapter)
print(sum(p.numel() for p in model.parameters()))
"""


def measure(command: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a child process, from the kernel's accounting (wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(command)}\n{process.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main(hidden_size: int = 2048, layers: int = 24, rounds: int = 2):
    python = sys.executable
    with tempfile.TemporaryDirectory(prefix="codeup-bench-export-") as work:
        work = Path(work)
        built = subprocess.run([python, "-c", BUILD, str(work / "base"), str(work / "adapter"), f"{hidden_size},{layers}", str(ROOT)],
                               capture_output=True, text=True, check=True)
        parameters = int(built.stdout.strip().splitlines()[-1])
        shards = len(list((work / "base").glob("*.safetensors")))
        size_mb = sum(f.stat().st_size for f in (work / "base").glob("*.safetensors")) / 2**20
        results = {"ours": [], "naive": []}
        for round_number in range(rounds):
            out = work / f"ours-{round_number}"
            results["ours"].append(measure([python, "export_checkpoint.py", "--base_model", str(work / "base"),
                                            "--lora_weights", str(work / "adapter"), "--export_dir", str(out),
                                            "--max_shard_size", "200MB"]))
            shutil.rmtree(out)
            out = work / f"naive-{round_number}"
            results["naive"].append(measure([python, "-c", NAIVE, str(work / "base"), str(work / "adapter"), str(out)]))
            shutil.rmtree(out)

    print(f"model: Llama-shaped, {parameters / 1e6:.0f}M parameters, float16, {shards} shards ({size_mb:.0f} MB); "
          f"LoRA r=16 on q/k/v/o; {rounds} alternating rounds (medians); {os.cpu_count()} cores")
    print()
    print("| merge | seconds | peak RSS (MB) |")
    print("| --- | ---: | ---: |")
    medians = {}
    for name, runs in results.items():
        medians[name] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        print(f"| {name} | {medians[name][0]:.1f} | {medians[name][1]:.0f} |")
    print(f"\nours / naive peak RSS: {medians['ours'][1] / medians['naive'][1]:.2f}x; time: {medians['ours'][0] / medians['naive'][0]:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
