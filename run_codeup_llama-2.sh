#!/usr/bin/env bash
# The CodeUp paper's recipe for Llama-2-7B on one 24 GB GPU, stage by stage:
# filter the data -> LoRA-tune the 8-bit base -> merge and export -> evaluate.
#   BASE_MODEL=meta-llama/Llama-2-7b-hf bash run_codeup_llama-2.sh [extra finetune.py flags]
# (or pass the base model as the first argument). Llama 2 is gated on the hub: accept its licence
# and `huggingface-cli login` first.
# Note: the stage scripts are being built (issues #3-#8); this recipe is their target.
set -euo pipefail
cd "$(dirname "$0")"
BASE_MODEL=${1:-${BASE_MODEL:-meta-llama/Llama-2-7b-hf}}
[[ $# -gt 0 ]] && shift
OUTPUT_DIR=${OUTPUT_DIR:-./codeup-llama-2-7b-hf}
PY=${PY:-.venv/bin/python}

$PY data/preprocess.py --data_paths data/code_alpaca_20k.json,data/new_codealpaca.json --output_dir data/

$PY finetune.py \
  --base_model "$BASE_MODEL" \
  --data_path data/codeup_19k.json \
  --output_dir "$OUTPUT_DIR" \
  --load_in_8bit \
  --lora_target_modules '[q_proj,k_proj,v_proj,o_proj]' \
  --lora_r 16 \
  --micro_batch_size 16 \
  --num_epochs 10 \
  --cutoff_len 512 \
  --group_by_length \
  "$@"

$PY export_checkpoint.py --base_model "$BASE_MODEL" --lora_weights "$OUTPUT_DIR" \
  --export_dir export_checkpoint/codeup-llama-2-7b --checkpoint_type hf

$PY evaluate.py --task humaneval --base_model "$BASE_MODEL" --lora_weights "$OUTPUT_DIR" --output_dir eval/
