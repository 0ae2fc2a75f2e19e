"""Evaluation stage: HumanEval and MBPP pass@k with sandboxed execution.

Not built yet: issue #7 fills this script. It runs as a fire CLI like every stage.
"""

from utils.cli import run_cli
from utils.errors import CodeUpError


def main(**flags):
    """Not built yet (issue #7)."""
    raise CodeUpError("evaluate.py is not built yet (issue #7)")


if __name__ == "__main__":
    run_cli(main)
