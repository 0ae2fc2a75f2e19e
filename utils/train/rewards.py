"""finetune_rl.py's problems and its reward: the sandbox's verdict on each sampled answer.

A problem is {"task_id", "prompt", "tests", "language", "solution"?}: `prompt` is the instruction,
`tests` is code that fails (exits non-zero, or never finishes) when the answer is wrong. An answer
is scored as evaluate.py scores a benchmark answer, through the same code (utils/eval/programs.py,
utils/eval/multilingual.py, utils/eval/sandbox.py): its code is taken out of the response the same
way, the program is the answer followed by the tests, and the program runs in the sandbox.

How the tests follow the answer, per language (one source file; MultiPL-E's convention):
- python: the answer, then the tests (asserts; MBPP's setup code first where it has one).
- js, sh, perl, php: the answer, then the tests, run as one script (`node`, `bash`, `perl`, `php`).
- cpp: the answer, then the tests, which bring their own `int main()` (asserts from <cassert>).
- rust: the answer, then the tests, which bring their own `fn main()` (assert!/assert_eq!).
- java: the answer's classes and methods, then the tests as `class Problem` with a `main`; an
  answer's methods are lifted out of any class it wrapped them in.
- go: one `_test.go` file of package main: the answer, then the tests as `func TestX(t *testing.T)`;
  goimports adds the imports the code uses.
"""

import ast
import re
from pathlib import Path

from utils.errors import CodeUpError
from utils.eval import multilingual
from utils.eval.benchmarks import benchmark_texts, load_humaneval, load_mbpp, ngrams
from utils.eval.programs import MBPP_TEST_IDS, extract_code, mbpp_problem, mbpp_program
from utils.eval.sandbox import Limits, run_programs
from utils.files import NOT_JSON, read_records
from utils.logs import logger

MBPP_TRAIN_IDS = range(511, 975)  # MBPP's train (511-910) and validation (911-974) splits
REWARDS = ("pass", "fraction")


# ---- problems ---------------------------------------------------------------------------------

def load_problems(data_path: str, *, mbpp_path: str) -> list[dict]:
    """The problems of a JSONL/JSON file, or of `mbpp-train` (MBPP's train and validation splits
    from mbpp_path, never its test split). Any bad record is an error naming it."""
    if data_path == "mbpp-train":
        if not Path(mbpp_path).expanduser().is_file():
            raise CodeUpError(f"--data_path mbpp-train reads MBPP from --mbpp_path, and {mbpp_path} is not a file")
        return [mbpp_train_problem(task) for task in load_mbpp(mbpp_path) if int(task["task_id"]) in MBPP_TRAIN_IDS]
    problems = []
    for where, record in read_records(data_path, what="--data_path", bad_lines="keep"):
        problems.append(checked_problem(record, where=f"{data_path} {where}"))
    if not problems:
        raise CodeUpError(f"--data_path {data_path} has no problems")
    return problems


def mbpp_train_problem(task: dict) -> dict:
    """An MBPP task as a problem: evaluate.py's instruction for MBPP, its asserts as the tests."""
    problem = mbpp_problem(task)
    tests = "\n".join([problem["setup"], *problem["tests"]]).strip() + "\n"
    return {"task_id": problem["task_id"], "prompt": problem["instruction"], "tests": tests, "language": "python",
            "solution": task.get("code", "")}


def checked_problem(record, *, where: str) -> dict:
    if record is NOT_JSON or not isinstance(record, dict):
        raise CodeUpError(f"{where}: not a JSON object")
    for field in ("prompt", "tests"):
        if not isinstance(record.get(field), str) or not record[field].strip():
            raise CodeUpError(f"{where}: no {field!r} (a problem is {{\"task_id\", \"prompt\", \"tests\", \"language\"}})")
    language = record.get("language") or "python"
    if language not in multilingual.LANGUAGES:
        raise CodeUpError(f"{where}: unknown language {language!r} (one of {', '.join(multilingual.LANGUAGES)})")
    solution = record.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise CodeUpError(f"{where}: 'solution' must be a string")
    return {"task_id": str(record.get("task_id", where)), "prompt": record["prompt"], "tests": record["tests"],
            "language": language, "solution": solution}


def check_toolchains(problems: list[dict]) -> None:
    """One error naming the Debian packages when a problem's language cannot be built here."""
    for key in sorted({p["language"] for p in problems} - {"python"}):
        multilingual.check_toolchain(key, "multiple")


# ---- decontamination ---------------------------------------------------------------------------

def benchmark_sources(*, mbpp_path: str, decontaminate_with: list[str]) -> list[tuple[str, list[tuple[str, str]]]]:
    """(label, [(task id, text)]) of what evaluate.py scores: HumanEval and MBPP's test split always,
    plus each benchmark named (files or folders, as data/preprocess.py --decontaminate_with takes)."""
    sources = [benchmark_texts("humaneval")]
    if Path(mbpp_path).expanduser().is_file():
        tests = [t for t in load_mbpp(mbpp_path) if int(t["task_id"]) in MBPP_TEST_IDS]
        sources.append((f"MBPP test split ({len(tests)} problems)",
                        [(f"MBPP/{t['task_id']}", "\n".join([t.get("text", ""), t.get("code", ""), *t.get("test_list", [])]))
                         for t in tests]))
    else:
        logger.warning(f"{mbpp_path} is not here: problems are not checked against MBPP's test split")
    return sources + [benchmark_texts(name) for name in decontaminate_with if name.lower() != "humaneval"]


def decontaminate(problems: list[dict], *, sources, n: int = 13) -> tuple[list[dict], dict[str, list[str]]]:
    """The problems that share no n-gram with a benchmark, and {benchmark label: dropped task ids}."""
    index = {}
    for label, texts in sources:
        for _, text in texts:
            for gram in ngrams(text, n=n):
                index.setdefault(gram, label)
    kept, dropped = [], {}
    for problem in problems:
        text = "\n".join([problem["prompt"], problem["tests"], problem.get("solution") or ""])
        label = next((index[gram] for gram in ngrams(text, n=n) if gram in index), None)
        if label is None:
            kept.append(problem)
        else:
            dropped.setdefault(label, []).append(problem["task_id"])
    return kept, dropped


# ---- programs and the reward -------------------------------------------------------------------

def answer_programs(problem: dict, code: str, *, timeout: float, fraction: bool = False) -> list:
    """What the sandbox runs for one answer: one program (Python source or a Job), or with
    fraction=True for a Python problem whose tests are several asserts, one program per assert."""
    if problem["language"] == "python":
        tests = split_asserts(problem["tests"]) if fraction else None
        if not tests:
            return [mbpp_program({"setup": "", "tests": [problem["tests"]]}, code)]
        setup, asserts = tests
        return [mbpp_program({"setup": setup, "tests": [one]}, code) for one in asserts]
    code, tests = (code, problem["tests"]) if problem["language"] != "go" else go_file_parts(code, problem["tests"])
    as_multiple = {"language": problem["language"], "prompt": "", "tests": tests, "benchmark": "multiple"}
    return [multilingual.job_for_source(problem["language"], multilingual.completion_program(as_multiple, code),
                                        "multiple", timeout)]


GO_IMPORT = re.compile(r'^[ \t]*import[ \t]*(\([^)]*\)|(\w+[ \t]+)?"[^"\n]*")[ \t]*$', re.MULTILINE)
GO_PACKAGE = re.compile(r"^[ \t]*package[ \t]+\w+[ \t]*$", re.MULTILINE)


def go_file_parts(code: str, tests: str) -> tuple[str, str]:
    """(head + answer, tests) of one Go file: a package line first (package main where the answer
    has none), then every import of the answer and of the tests (Go wants them before any
    declaration), then the answer and the tests without them."""
    imports = GO_IMPORT.findall(code) + GO_IMPORT.findall(tests)
    package = GO_PACKAGE.search(code)
    head = (package.group(0).strip() if package else "package main") + "\n\n"
    head += "".join(f"import {spec}\n" for spec, _ in imports)
    body = GO_IMPORT.sub("", GO_PACKAGE.sub("", code))
    return head + "\n" + body, GO_IMPORT.sub("", tests)


def counted_asserts(problem: dict, count: int) -> list[bool]:
    """Which of an answer's `count` programs count toward the fraction reward: an assert quoted in
    the problem's prompt does not (unless every one is), since an answer that returns its
    expected value as a constant passes it. Measured: on mbpp-train, whose prompts show the first
    assert, 60 steps of counting it taught SmolLM2 exactly that, and MBPP-test pass@1 fell from
    0.08 to 0.01 (docs/results.md)."""
    tests = split_asserts(problem["tests"]) if problem["language"] == "python" else None
    if not tests or len(tests[1]) != count:
        return [True] * count
    prompt = " ".join(problem["prompt"].split())
    hidden = [" ".join(one.split()) not in prompt for one in tests[1]]
    return hidden if any(hidden) else [True] * count


def split_asserts(tests: str) -> tuple[str, list[str]] | None:
    """(the setup statements, each top-level assert) of Python tests with two asserts or more."""
    try:
        statements = ast.parse(tests).body
    except SyntaxError:
        return None
    asserts = [ast.get_source_segment(tests, s) for s in statements if isinstance(s, ast.Assert)]
    setup = "\n".join(ast.get_source_segment(tests, s) for s in statements if not isinstance(s, ast.Assert))
    return (setup, asserts) if len(asserts) >= 2 else None


class SandboxReward:
    """TRL reward function: for each completion, the sandbox's verdict on its problem's tests.

    reward="pass": 1.0 when every test passes, else 0.0; "fraction": the share of a Python
    problem's asserts that pass, those quoted in its prompt left out (other problems: pass).
    Compile errors, crashes and timeouts are 0.
    All completions of a step run at once, `workers` at a time. `pass_rate` (a second reward
    function, weighted 0 by finetune_rl.py) logs the share of completions that pass whole."""

    def __init__(self, problems: list[dict], *, response_of, reward: str = "pass", timeout: float = 5.0,
                 workers: int | None = None):
        if reward not in REWARDS:
            raise CodeUpError(f"--reward takes {' or '.join(REWARDS)}, not {reward!r}")
        self.problems = {p["task_id"]: p for p in problems}
        self.response_of = response_of  # generated text -> the answer (cut where the template's next section starts)
        self.reward, self.timeout, self.workers = reward, timeout, workers
        self.__name__ = f"sandbox_{reward}"
        self.last_passed: list[bool] = []

    def scores(self, completions: list[str], task_ids: list[str]) -> tuple[list[float], list[bool]]:
        """(reward, passed whole) per completion."""
        plans, counted = [], []
        for completion, task_id in zip(completions, task_ids):
            problem = self.problems[task_id]
            code = extract_code(self.response_of(completion))
            plans.append(answer_programs(problem, code, timeout=self.timeout, fraction=self.reward == "fraction"))
            counted.append(counted_asserts(problem, len(plans[-1])))
        flat = [program for programs in plans for program in programs]
        outcomes = iter(run_programs(flat, limits=Limits(timeout=self.timeout), workers=self.workers, progress=False))
        rewards, passed = [], []
        for programs, counts in zip(plans, counted):
            verdicts = [next(outcomes).passed for _ in programs]
            rewards.append(sum(v for v, c in zip(verdicts, counts) if c) / sum(counts))
            passed.append(all(verdicts))
        return rewards, passed

    def __call__(self, prompts=None, completions=None, task_id=None, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        rewards, self.last_passed = self.scores(texts, list(task_id))
        return rewards

    def pass_rate(self, prompts=None, completions=None, task_id=None, **kwargs) -> list[float]:
        """The same step's verdicts, whole passes only (no new runs: called right after __call__)."""
        return [float(p) for p in self.last_passed]


def check_solutions(problems: list[dict], *, timeout: float) -> tuple[list[dict], list[str]]:
    """The problems whose own solution (where given) passes its tests, and the ids of those dropped."""
    with_solution = [p for p in problems if p.get("solution")]
    programs = [answer_programs(p, p["solution"], timeout=timeout)[0] for p in with_solution]
    outcomes = run_programs(programs, limits=Limits(timeout=timeout), progress=False) if programs else []
    failing = {p["task_id"] for p, outcome in zip(with_solution, outcomes) if not outcome.passed}
    return [p for p in problems if p["task_id"] not in failing], sorted(failing)
