#!/usr/bin/env bash
# The CodeUp paper's recipe for Llama-2-7B on one 24 GB GPU, stage by stage:
# filter the data -> LoRA-tune the 8-bit base -> merge and export -> evaluate on HumanEval.
#   bash run_codeup_llama-2.sh [BASE_MODEL] [extra finetune.py flags]
#   BASE_MODEL=meta-llama/Llama-2-7b-hf bash run_codeup_llama-2.sh --num_epochs 3
# Llama 2 is gated on the hub: accept its licence on the model page and `hf auth login` first
# (a local HF folder works too). Needs data/code_alpaca_20k.json and data/new_codealpaca.json
# (python data/download.py). Settings: OUTPUT_DIR, PY.
set -euo pipefail
cd "$(dirname "$0")"
if [[ $# -gt 0 && $1 != --* ]]; then BASE_MODEL=$1; shift; fi
BASE_MODEL=${BASE_MODEL:-meta-llama/Llama-2-7b-hf}
NAME=$(basename "$BASE_MODEL")
OUTPUT_DIR=${OUTPUT_DIR:-./codeup-$NAME}
PY=${PY:-.venv/bin/python}

$PY data/preprocess.py --data_paths data/code_alpaca_20k.json,data/new_codealpaca.json --output_dir data/
# The filtered file's name depends on the count kept (codeup_19k.json with the full data): read it.
TRAIN_FILE="data/$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['output'])" data/report.json)"

# An 8-bit base checkpoints activations by default (reentrant: see finetune.checkpoint_reentrant).
# Measured on an H100 (bench/RESULTS.md), 8-bit Llama-2-7B with checkpointing peaks at 15.4 GiB with
# the paper's micro-batches of 16 x 512 tokens: it fits a 24 GB card. On a 16 GB card pass
# --micro_batch_size 4 (9.5 GiB; the batch of 128 trains the same, at about half the tokens/s).
$PY finetune.py \
  --base_model "$BASE_MODEL" \
  --data_path "$TRAIN_FILE" \
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
  --output_dir "export_checkpoint/codeup-$NAME" --checkpoint_type hf --overwrite

$PY evaluate.py --task humaneval --base_model "export_checkpoint/codeup-$NAME/hf_ckpt" --output_dir "eval/codeup-$NAME"
