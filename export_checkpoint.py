"""Export stage: merge a LoRA adapter into its base and export it for transformers, PyTorch and llama.cpp.

Not built yet: issue #6 fills this script. It runs as a fire CLI like every stage.
"""

from utils.cli import run_cli
from utils.errors import CodeUpError


def main(**flags):
    """Not built yet (issue #6)."""
    raise CodeUpError("export_checkpoint.py is not built yet (issue #6)")


if __name__ == "__main__":
    run_cli(main)
