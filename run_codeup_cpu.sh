#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, no hub access).
# Sets up what is missing (.venv), then runs every stage that exists so far.
#   bash run_codeup_cpu.sh [extra flags for generate.py]
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python

# Stages still being built (issues #4-#8): finetune.py, export_checkpoint.py, evaluate.py.
# Until they land, the job filters the data (when it is in data/) and answers an instruction.
if [[ -f data/code_alpaca_20k.json && -f data/new_codealpaca.json ]]; then
  echo "== data: filter the instruction records by programming language"
  $PY data/preprocess.py --output_dir data/
else
  echo "== data: skipped (put code_alpaca_20k.json and new_codealpaca.json in data/, see data/README.md)"
fi
echo "== generate: SmolLM2-135M answers an instruction"
$PY generate.py --instruction "Write a Python function that returns the factorial of n." "$@"
