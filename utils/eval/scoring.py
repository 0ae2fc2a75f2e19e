"""evaluate.py's scorer, shared with finetune.py's in-training pass@k (utils/train/code_eval.py): the
problems of each task, the answers of a Generator, each answer's program run in the sandbox, and
pass@k by the Codex paper's unbiased estimator. One code path, so that a score logged during
training is the score evaluate.py gives the same checkpoint."""

import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils.errors import CodeUpError
from utils.eval import multilingual
from utils.eval.benchmarks import load_humaneval, load_mbpp
from utils.eval.programs import MBPP_TEST_IDS, build_program, extract_code, mbpp_problem
from utils.eval.sandbox import Limits, run_programs
from utils.files import write_atomically, write_json
from utils.logs import progress_bars_wanted

HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function in a "
                         "```python code block.")
TASK_NAMES = ("humaneval", "mbpp", *multilingual.TASKS)
GENERATION_BATCH = 8  # prompts generated together (evaluate.py --batch_size); padding changes the numbers a little


# ---- problems ----------------------------------------------------------------------------------

def load_problems(task: str, mbpp_path: str, *, limit: int | None, problems_file: str = "",
                  benchmarks_dir: str = "data/") -> list[dict]:
    """Problems as {task_id, instruction, input, ...}: HumanEval's 164, MBPP's test split, or a
    HumanEval-X / MultiPL-E language (from problems_file, else its place under benchmarks_dir)."""
    if multilingual.is_multilingual(task):
        path = problems_file or multilingual.default_problems_file(task, benchmarks_dir=benchmarks_dir)
        problems = multilingual.load_problems(task, problems_file=str(path))
    elif task == "humaneval":
        problems = [dict(p, instruction=HUMANEVAL_INSTRUCTION, input=p["prompt"]) for p in load_humaneval()]
    elif task == "mbpp":
        problems = [mbpp_problem(t) for t in read_mbpp(mbpp_path) if int(t["task_id"]) in MBPP_TEST_IDS]
    else:
        raise CodeUpError(f"--task must be humaneval, mbpp, or one or more of {', '.join(multilingual.TASKS)}; "
                          f"not {task!r}")
    return problems[:limit] if limit else problems


def read_mbpp(mbpp_path: str) -> list[dict]:
    path = Path(mbpp_path).expanduser()
    if path.exists() or path.suffix in (".json", ".jsonl"):
        return load_mbpp(str(path))
    from datasets import load_dataset  # a hub dataset id, for users who have the hub

    try:
        return list(load_dataset(mbpp_path, split="test"))
    except Exception as error:
        raise CodeUpError(f"--mbpp_path {mbpp_path}: not a file, and the hub said: {str(error).splitlines()[0]}") from None


def problems_of_tasks(tasks: list[str], *, mbpp_path: str, limit: int | None, problems_file: str = "",
                      benchmarks_dir: str = "data/") -> list[dict]:
    """Every task's problems, each marked with its task. A missing compiler is one clear line
    before any work."""
    problems = []
    for name in tasks:
        if multilingual.is_multilingual(name):
            benchmark, key, _ = multilingual.TASKS[name]
            multilingual.check_toolchain(key, benchmark=benchmark)
        problems += [dict(p, task=name) for p in load_problems(name, mbpp_path, limit=limit, problems_file=problems_file,
                                                               benchmarks_dir=benchmarks_dir)]
    return problems


# ---- answers -----------------------------------------------------------------------------------

def answer_problems(generator, problems: list[dict], *, n_samples: int = 1, temperature: float = 0.0,
                    max_new_tokens: int = 512, batch_size: int = GENERATION_BATCH, max_seconds: float | None = None,
                    progress: bool | None = None) -> list[dict]:
    """n_samples answers per problem from a utils/serve/generation.py Generator, batched, each with
    the code taken out of it. max_seconds: generation stops there (the batch under way ends early,
    later ones are not started) and the unanswered samples get an empty response."""
    from tqdm.auto import tqdm

    requests = [problem for problem in problems for _ in range(n_samples)]
    settings = dict(temperature=temperature, top_p=0.95, top_k=0, num_beams=1, max_new_tokens=max_new_tokens)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    samples = []
    disable = not (progress_bars_wanted() if progress is None else progress)
    with tqdm(total=len(requests), desc="Generating", unit="sample", disable=disable) as bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                responses = [""] * len(batch)
            else:
                responses = generator.answer_batch([(p["instruction"], p["input"]) for p in batch], max_time=left,
                                                   **settings)
            for problem, response in zip(batch, responses):
                prompt = generator.prompter.generate_prompt(problem["instruction"], input=problem["input"])
                samples.append({"task": problem.get("task"), "task_id": problem["task_id"], "prompt": prompt,
                                "response": response, "code": extract_code(response, problem)})
            bar.update(len(batch))
    return samples


# ---- programs and pass@k -----------------------------------------------------------------------

def run_samples(samples: list[dict], problems: list[dict], *, timeout: float, workers: int | None = None,
                progress: bool | None = None) -> list:
    """Each sample's program (its code with its problem's tests), run in the sandbox: its Outcome."""
    by_key = {(p["task"], p["task_id"]): p for p in problems}
    programs = [build_program(s["task"], by_key[s["task"], s["task_id"]], s["code"], timeout=timeout) for s in samples]
    return run_programs(programs, limits=Limits(timeout=timeout), workers=workers,
                        progress=progress_bars_wanted() if progress is None else progress)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the Codex paper: 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(passed_by_task: dict[str, list[bool]], ks: list[int]) -> dict[str, float]:
    results = {}
    for k in ks:
        if all(len(runs) >= k for runs in passed_by_task.values()):
            results[f"pass@{k}"] = float(np.mean([pass_at_k(n=len(r), c=sum(r), k=k) for r in passed_by_task.values()]))
    return results


def task_results(task: str, *, samples: list[dict], outcomes: list, ks: list[int]) -> dict:
    """One task's scores (pass@k, counts of problems, samples, passes, timeouts, compile errors);
    each sample gets its outcome (passed, status, result)."""
    passed_by_task = defaultdict(list)
    for sample, outcome in zip(samples, outcomes):
        sample.update(passed=outcome.passed, status=outcome.status, result=outcome.message)
        passed_by_task[sample["task_id"]].append(outcome.passed)
    language = multilingual.language_of(task).name if multilingual.is_multilingual(task) else "Python"
    return {"task": task, "language": language, **mean_pass_at_k(passed_by_task, ks=ks),
            "problems": len(passed_by_task), "samples": len(samples), "passed": sum(o.passed for o in outcomes),
            "timeouts": sum(o.status == "timeout" for o in outcomes),
            "compile_errors": sum(o.status == "compile error" for o in outcomes)}


def write_task_results(samples: list[dict], outcomes: list, *, tasks: list[str], ks: list[int], model,
                       settings: dict, output: Path, started: float) -> list[dict]:
    """The results of each task that has samples, each written with its samples into `output`
    ({task}_results.json, {task}_samples.jsonl)."""
    output.mkdir(parents=True, exist_ok=True)
    all_results = []
    for name in tasks:
        chosen = [i for i, sample in enumerate(samples) if sample["task"] == name]
        if not chosen:
            continue
        task_samples = [samples[i] for i in chosen]
        results = task_results(name, samples=task_samples, outcomes=[outcomes[i] for i in chosen], ks=ks)
        results = {"task": name, "model": model, **{key: v for key, v in results.items() if key != "task"},
                   "settings": settings, "seconds": round(time.time() - started, 1)}
        all_results.append(results)
        write_atomically(output / f"{name}_samples.jsonl",
                         "".join(json.dumps({key: v for key, v in s.items() if key != "task"}, ensure_ascii=False) + "\n"
                                 for s in task_samples))
        write_json(output / f"{name}_results.json", results)
    return all_results
