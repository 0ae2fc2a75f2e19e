#!/usr/bin/env bash
# The same recipe as run_codeup_llama-2.sh, for LLaMA (1) 7B.
#   bash run_codeup_llama.sh [BASE_MODEL] [extra finetune.py flags]
# LLaMA 1's weights are not openly licensed: pass a copy you may use (hub id or local HF folder).
set -euo pipefail
cd "$(dirname "$0")"
if [[ $# -gt 0 && $1 != --* ]]; then BASE_MODEL=$1; shift; fi
exec bash run_codeup_llama-2.sh "${BASE_MODEL:-huggyllama/llama-7b}" "$@"
