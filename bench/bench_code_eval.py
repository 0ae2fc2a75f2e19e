"""What pass@1 while training costs: finetune.py at the main job's settings, with and without
--eval_task humaneval; and the in-training evaluation under torchrun (2 processes) against 1.

    .venv/bin/python bench/bench_code_eval.py [--data_path data/sample_codeup.json] [--eval_limit 3]

1. The main job's finetune.py (run_codeup_cpu.sh: SmolLM2-135M, 40 steps x 16 examples, cutoff 256,
   LoRA r=8 on q/k/v/o, validation 32 examples every 10 steps) twice, in their own processes: without
   and with `--eval_task humaneval --eval_limit N` (N problems answered greedily, up to 512 tokens, and
   run in the sandbox at each of the 4 evaluations). Reported: the training's wall time (train_runtime)
   of each, the difference, the evaluations' own time (eval_code_runtime, summed) and its share of the
   run with them.
2. The in-training evaluation alone (2 steps, one evaluation of N + 1 problems, no validation set) in
   one process and under `torchrun --nproc_per_node 2` (each process answers half the problems and runs
   their programs; OMP_NUM_THREADS=1 each, as the two share the machine's cores): eval_code_runtime.
Prints Markdown tables for bench/RESULTS.md.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import fire  # noqa: E402

MAIN_JOB = ["--base_model", "smollm2-135m", "--batch_size", "16", "--micro_batch_size", "4", "--cutoff_len", "256",
            "--learning_rate", "3e-4", "--warmup_steps", "5", "--logging_steps", "5",
            "--lora_target_modules", "[q_proj,k_proj,v_proj,o_proj]"]


def run(arguments: list[str], *, output: Path, torchrun: int = 0) -> dict:
    """One finetune.py run in its own process; its log history and wall time."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun)] if torchrun else [sys.executable]
    env = {**os.environ, "CODEUP_PROGRESS": "0", **({"OMP_NUM_THREADS": "1"} if torchrun else {})}
    started = time.time()
    result = subprocess.run([*launcher, "finetune.py", *arguments, "--output_dir", str(output)], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"finetune.py failed:\n{result.stderr[-3000:]}")
    history = json.loads((output / "trainer_state.json").read_text())["log_history"]
    return {"history": history, "wall": time.time() - started}


def logged(history: list[dict], name: str) -> list:
    return [entry[name] for entry in history if name in entry]


def main(data_path: str = "data/sample_codeup.json", eval_limit: int = 3, max_steps: int = 40):
    data = ["--data_path", str(Path(data_path).resolve())]
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        settings = [*MAIN_JOB, *data, "--max_steps", str(max_steps), "--val_set_size", "32", "--eval_steps", "10",
                    "--save_steps", "20"]
        without = run(settings, output=work / "without")
        with_eval = run([*settings, "--eval_task", "humaneval", "--eval_limit", str(eval_limit)], output=work / "with")
        alone = [*MAIN_JOB, *data, "--max_steps", "2", "--val_set_size", "0", "--eval_steps", "2", "--save_steps", "2",
                 "--eval_task", "humaneval", "--eval_limit", str(eval_limit + 1)]
        one = run(alone, output=work / "one")
        two = run(alone, output=work / "two", torchrun=2)

    runtime = {name: logged(r["history"], "train_runtime")[0] for name, r in (("without", without), ("with", with_eval))}
    spent = sum(logged(with_eval["history"], "eval_code_runtime"))
    scores = logged(with_eval["history"], "eval_humaneval_pass@1")
    print(f"finetune.py at the main job's settings ({max_steps} steps, {data_path}); --eval_task humaneval "
          f"--eval_limit {eval_limit} at each of {len(scores)} evaluations:\n")
    print("| run | training wall time (s) | in-training pass@1 evaluations (s) | share of the run | pass@1 logged |")
    print("| --- | ---: | ---: | ---: | --- |")
    print(f"| without --eval_task | {runtime['without']:.0f} | - | - | - |")
    print(f"| with --eval_task humaneval --eval_limit {eval_limit} | {runtime['with']:.0f} | {spent:.0f} | "
          f"{100 * spent / runtime['with']:.0f}% | {', '.join(f'{s:.2f}' for s in scores)} |")
    print(f"\nDifference: {runtime['with'] - runtime['without']:+.0f} s.\n")
    print(f"One in-training evaluation of {eval_limit + 1} HumanEval problems:\n")
    print("| processes | eval_code_runtime (s) | pass@1 |")
    print("| ---: | ---: | ---: |")
    for name, r in (("1", one), ("2 (torchrun, OMP_NUM_THREADS=1 each)", two)):
        print(f"| {name} | {logged(r['history'], 'eval_code_runtime')[0]:.1f} | "
              f"{logged(r['history'], 'eval_humaneval_pass@1')[0]:.2f} |")


if __name__ == "__main__":
    fire.Fire(main)
