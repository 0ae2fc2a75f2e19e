"""Training stage: LoRA instruction tuning on an 8-bit (or 4-bit) base with PEFT.

Not built yet: issue #4 fills this script. It runs as a fire CLI like every stage.
"""

from utils.cli import run_cli
from utils.errors import CodeUpError


def main(**flags):
    """Not built yet (issue #4)."""
    raise CodeUpError("finetune.py is not built yet (issue #4)")


if __name__ == "__main__":
    run_cli(main)
