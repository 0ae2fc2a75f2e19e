#!/usr/bin/env bash
# The main job on the embedded default model (SmolLM2-135M-Instruct, CPU, no hub access).
# Sets up what is missing (.venv), then runs every stage that exists so far.
#   bash run_codeup_cpu.sh [extra flags for generate.py]
set -euo pipefail
cd "$(dirname "$0")"
bash setup.sh
PY=.venv/bin/python

# Stages still being built (issues #3-#8): data/preprocess.py, finetune.py, export_checkpoint.py,
# evaluate.py. Until they land, the job answers an instruction with the default model.
echo "== generate: SmolLM2-135M answers an instruction"
$PY generate.py --instruction "Write a Python function that returns the factorial of n." "$@"
