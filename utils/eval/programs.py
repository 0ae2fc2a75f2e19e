"""How a benchmark answer becomes a program the sandbox runs: the code taken out of a response, and
the program of HumanEval, MBPP and HumanEval-X/MultiPL-E (utils/eval/multilingual.py) problems. One
code path for evaluate.py's scores and finetune_rl.py's rewards, so that the two cannot disagree."""

import re

from utils.eval import multilingual

MBPP_TEST_IDS = range(11, 511)  # MBPP's standard test split: scored, never trained on
FENCED_BLOCK = re.compile(r"```[ \t]*[\w+#.-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def mbpp_problem(task: dict) -> dict:
    """The task text plus its first test, which shows the function's name and signature."""
    tests = list(task["test_list"])
    name = re.search(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(", tests[0])
    signature = f" The function is called `{name.group(1)}`." if name else ""
    instruction = f"{task['text']}{signature} Your code should pass this test:\n{tests[0]}"
    return {"task_id": f"MBPP/{task['task_id']}", "instruction": instruction, "input": "",
            "tests": tests, "setup": task.get("test_setup_code", "") or "", "reference": task.get("code", "")}


def extract_code(response: str, problem: dict | None = None) -> str:
    """The code in a response: its first fenced block that defines the problem's function (a
    Python `def` for HumanEval and MBPP), else the first fenced block, else the whole response."""
    blocks = FENCED_BLOCK.findall(response)
    if not blocks:
        return response
    if problem and problem.get("language"):
        defining = [b for b in blocks if multilingual.defines_function(problem["language"], b, problem["entry_point"])]
    else:
        defining = [b for b in blocks if "def " in b]
    return (defining or blocks)[0]


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


def build_program(task: str, problem: dict, code: str, timeout: float = 3.0):
    """What the sandbox runs: Python source (HumanEval, MBPP), or a compile-and-run Job."""
    if multilingual.is_multilingual(task):
        return multilingual.build_job(problem, code, timeout)
    return humaneval_program(problem, code) if task == "humaneval" else mbpp_program(problem, code)
