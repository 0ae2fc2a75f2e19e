"""pass@k while training (finetune.py --eval_task): judge checkpoints by code that runs, not by loss.

At each evaluation the adapter in training answers the first --eval_limit problems of each task
greedily, prompted as it is trained, and evaluate.py's own scorer (utils/eval/scoring.py) runs the
answers with the problems' tests in the sandbox: `eval_<task>_pass@1` is logged beside eval_loss, so
that the Trainer can keep (and early-stop on) the best checkpoint by it. The answers and their outcomes
go to {output_dir}/eval_samples/step-N/, as evaluate.py writes them.

Time limits: generation stops after --eval_max_seconds (the unfinished answers count as failed, and
a warning says so) and each program after the sandbox's timeout; an evaluation that fails outright
logs NaN with a warning. Training goes on, and the checkpoint is saved, either way.

Under torchrun each process answers every world_size-th problem and runs its programs; the outcomes
are gathered, so every process logs the same value (bench/RESULTS.md has the timings).
"""

import math
import time
from pathlib import Path

import torch

from utils.errors import CodeUpError
from utils.eval.benchmarks import ngrams
from utils.eval.sandbox import require_a_sandbox
from utils.eval.scoring import (GENERATION_BATCH, TASK_NAMES, answer_problems, problems_of_tasks, run_samples,
                                task_results, write_task_results)
from utils.logs import logger

SAMPLES_DIR = "eval_samples"
# A problem's own text, as decontamination compares it. MBPP's task text is its instruction; the
# other benchmarks' instruction is CodeUp's generic one ("Complete the following ... function").
PROBLEM_FIELDS = ("prompt", "declaration", "canonical_solution", "test", "tests", "setup", "reference")


def metric_name(task: str) -> str:
    """The name pass@1 of a task is logged under (what --metric_for_best_model may name)."""
    return f"eval_{task}_pass@1"


class CodeEvaluation:
    """The problems of --eval_task, loaded and checked before any model loads, and the scoring of a
    model in training on them."""

    def __init__(self, *, tasks: list[str], limit: int, base_model: str, prompt_template: str, mbpp_path: str,
                 benchmarks_dir: str, max_new_tokens: int, max_seconds: float, timeout: float = 3.0):
        unknown = [task for task in tasks if task not in TASK_NAMES]
        if unknown:
            raise CodeUpError(f"--eval_task {unknown[0]!r} is not a task evaluate.py knows: "
                              f"humaneval, mbpp, {', '.join(TASK_NAMES[2:])}")
        if limit < 1:
            raise CodeUpError(f"--eval_limit must be at least 1 (problems per task), not {limit}")
        if max_new_tokens < 1 or max_seconds <= 0:
            raise CodeUpError("--eval_max_new_tokens and --eval_max_seconds must be positive")
        self.tasks, self.limit, self.base_model, self.prompt_template = tasks, limit, base_model, prompt_template
        self.max_new_tokens, self.max_seconds, self.timeout = max_new_tokens, max_seconds, timeout
        # A missing compiler or benchmark file is one error here, before minutes of training.
        self.problems = problems_of_tasks(tasks, mbpp_path=mbpp_path, limit=limit, benchmarks_dir=benchmarks_dir)
        require_a_sandbox(False)  # model-written code runs only in the sandbox
        self.tokenizer = None

    def metric_names(self) -> list[str]:
        return [metric_name(task) for task in self.tasks]

    def warn_about_overlap(self, records, *, n: int = 13) -> int:
        """Warns when training records share an n-gram (data/preprocess.py's decontamination
        measure) with the problems scored: the score would then measure memory. Returns how many do."""
        index = {}
        for problem in self.problems:
            fields = PROBLEM_FIELDS + (("instruction",) if problem["task"] == "mbpp" else ())
            text = "\n".join(str(problem[field]) if isinstance(problem[field], str) else "\n".join(map(str, problem[field]))
                             for field in fields if problem.get(field))
            for gram in ngrams(text, n=n):
                index.setdefault(gram, problem["task_id"])
        overlapping = {}
        for number, record in enumerate(records):
            task_id = next((index[gram] for gram in ngrams(record_text(record), n=n) if gram in index), None)
            if task_id is not None:
                overlapping.setdefault(task_id, number)
        if overlapping:
            examples = ", ".join(f"{task_id} (record {number})" for task_id, number in list(overlapping.items())[:3])
            logger.warning(f"{len(overlapping)} of the {len(self.problems)} problems --eval_task scores share a {n}-gram "
                           f"with the training data ({examples}): their pass@1 measures memory as well as skill "
                           "(data/preprocess.py --mode strict drops such records)")
        return len(overlapping)

    def score(self, model, *, step: int, output_dir: str) -> dict[str, float]:
        """{eval_<task>_pass@1: value} of the model as it is now, and eval_code_runtime (seconds);
        the same in every process. The model is put in eval mode for the answers and back."""
        started = time.monotonic()
        rank, world_size = process_rank_and_count()
        mine = self.problems[rank::world_size]
        try:
            local = self._answer_and_run(model, mine)
        except Exception as error:  # noqa: BLE001 (training must go on: the error is reported below)
            local = f"{type(error).__name__}: {error}"
        gathered = gather(local, world_size=world_size)
        errors = [part for part in gathered if isinstance(part, str)]
        if errors:
            logger.warning(f"the pass@1 evaluation at step {step} failed ({errors[0]}); logged as NaN, training goes on")
            return {**{name: math.nan for name in self.metric_names()}, "eval_code_runtime": round(time.monotonic() - started, 1)}
        # Back in the problems' order: process r answered problems r, r + world_size, ...
        samples, outcomes = [None] * len(self.problems), [None] * len(self.problems)
        for part_rank, (part_samples, part_outcomes) in enumerate(gathered):
            samples[part_rank::world_size] = part_samples
            outcomes[part_rank::world_size] = part_outcomes
        metrics = {metric_name(task): task_results(task, samples=[s for s in samples if s["task"] == task],
                                                   outcomes=[o for s, o in zip(samples, outcomes) if s["task"] == task],
                                                   ks=[1])["pass@1"]
                   for task in self.tasks}
        seconds = round(time.monotonic() - started, 1)
        if rank == 0:
            settings = {"n_samples": 1, "temperature": 0.0, "k": [1], "limit": self.limit,
                        "timeout": self.timeout, "prompt_template": self.prompt_template,
                        "max_new_tokens": self.max_new_tokens, "step": step}
            write_task_results(samples, outcomes, tasks=self.tasks, ks=[1], model=f"{output_dir} at step {step}",
                               settings=settings, output=Path(output_dir) / SAMPLES_DIR / f"step-{step}",
                               started=time.time() - seconds)
        return {**metrics, "eval_code_runtime": seconds}

    def _answer_and_run(self, model, problems: list[dict]) -> tuple[list[dict], list]:
        from utils.model_loading import load_tokenizer
        from utils.serve.generation import Generator

        if self.tokenizer is None:  # generation pads on the left; training's tokenizer pads on the right
            self.tokenizer = load_tokenizer(self.base_model, padding_side="left")
        generator = Generator.around(model, tokenizer=self.tokenizer, prompt_template=self.prompt_template)
        was_training = model.training
        model.eval()  # no dropout: greedy answers, as evaluate.py's
        started = time.monotonic()
        try:
            samples = answer_problems(generator, problems, max_new_tokens=self.max_new_tokens,
                                      batch_size=GENERATION_BATCH, max_seconds=self.max_seconds, progress=False)
        finally:
            model.train(was_training)
        if time.monotonic() - started >= self.max_seconds:
            logger.warning(f"the pass@1 evaluation's generation reached --eval_max_seconds ({self.max_seconds:g} s): "
                           "the answers it had not finished count as failed")
        outcomes = run_samples(samples, problems, timeout=self.timeout, progress=False) if samples else []
        return samples, outcomes


def record_text(record) -> str:
    """Every string in a training record (Alpaca fields, or chat messages), joined."""
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        return "\n".join(record_text(value) for value in record.values())
    if isinstance(record, (list, tuple)):
        return "\n".join(record_text(value) for value in record)
    return ""


def process_rank_and_count() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def gather(local, *, world_size: int) -> list:
    """Every process's `local` (any picklable object), in rank order."""
    if world_size == 1:
        return [local]
    gathered = [None] * world_size
    torch.distributed.all_gather_object(gathered, local)
    return gathered
