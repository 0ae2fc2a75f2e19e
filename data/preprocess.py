"""Data stage: filter instruction records by programming language (Guesslang), as CodeUp did.

Not built yet: issue #3 fills this script. It runs as a fire CLI like every stage.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import CodeUpError, run_cli  # noqa: E402


def main(**flags):
    """Not built yet (issue #3)."""
    raise CodeUpError("preprocess.py is not built yet (issue #3)")


if __name__ == "__main__":
    run_cli(main)
