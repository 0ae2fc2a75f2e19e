#!/usr/bin/env bash
# The main job: every stage of CodeUp on a CPU with the embedded default model (SmolLM2-135M),
# from a fresh clone to filtered data, a LoRA adapter, merged exports, a HumanEval score and the
# command that opens the web demo. About 8 minutes on 2 cores.
#   bash run_codeup_cpu.sh
# Settings (environment): BASE_MODEL (smollm2-135m), DATA_DIR (data: where code_alpaca_20k.json and
# new_codealpaca.json are looked for; without them data/sample_codeup.json is used), WORK_DIR
# (runs/smollm2), MAX_STEPS (40), EVAL_LIMIT (20 HumanEval problems), EVAL_TASK2 (humanevalx-js: the
# language scored besides Python, on EVAL_LIMIT2 = 10 problems; any task of evaluate.py, or "none"),
# TRAIN_EVAL_LIMIT (3: HumanEval problems answered at each of finetune.py's evaluations, logged as
# eval_humaneval_pass@1 beside eval_loss and in loss.png; 0: none),
# BENCHMARKS_DIR (DATA_DIR: where humaneval-x/ and multipl-e/ are, see data/download.py --benchmarks only),
# SKIP_SETUP (set: use the current environment), PY (the Python to run).
# Each stage skips work whose outputs are already there and valid; delete a stage's folder in
# WORK_DIR to run it again, or run its script alone with the flags printed below.
set -euo pipefail
cd "$(dirname "$0")"
BASE_MODEL=${BASE_MODEL:-smollm2-135m}
DATA_DIR=${DATA_DIR:-data}
WORK_DIR=${WORK_DIR:-runs/smollm2}
MAX_STEPS=${MAX_STEPS:-40}
EVAL_LIMIT=${EVAL_LIMIT:-20}
EVAL_TASK2=${EVAL_TASK2:-humanevalx-js}
EVAL_LIMIT2=${EVAL_LIMIT2:-10}
TRAIN_EVAL_LIMIT=${TRAIN_EVAL_LIMIT:-3}
BENCHMARKS_DIR=${BENCHMARKS_DIR:-$DATA_DIR}
[[ -n "${SKIP_SETUP:-}" ]] || bash setup.sh
PY=${PY:-.venv/bin/python}
export GRADIO_ANALYTICS_ENABLED=False HF_HUB_DISABLE_TELEMETRY=1
mkdir -p "$WORK_DIR"
job_start=$SECONDS
stage_start=$SECONDS
stage() { stage_start=$SECONDS; echo; echo "== $*"; }
done_in() { echo "   ($((SECONDS - stage_start)) s)"; }
skip() { echo "   skipped: $* (delete it to run this stage again)"; }

stage "1/4 data: filter the instruction records by programming language"
if [[ -f "$DATA_DIR/code_alpaca_20k.json" && -f "$DATA_DIR/new_codealpaca.json" ]]; then
  inputs="$DATA_DIR/code_alpaca_20k.json,$DATA_DIR/new_codealpaca.json"
else
  inputs="data/sample_codeup.json"
  echo "   the Code Alpaca files are not in $DATA_DIR: using data/sample_codeup.json (get them with: $PY data/download.py)"
fi
data_report="$WORK_DIR/data/report.json"
if [[ -f "$data_report" ]] && $PY -c "import json,sys; r=json.load(open(sys.argv[1])); sys.exit(list(r['inputs']) != sys.argv[2].split(','))" "$data_report" "$inputs"; then
  skip "$WORK_DIR/data holds the filtered data of these inputs"
else
  $PY data/preprocess.py --data_paths "$inputs" --output_dir "$WORK_DIR/data"
fi
train_file="$WORK_DIR/data/$($PY -c "import json,sys; print(json.load(open(sys.argv[1]))['output'])" "$data_report")"
done_in

stage "2/4 finetune: LoRA on $BASE_MODEL, $MAX_STEPS step$([[ $MAX_STEPS == 1 ]] || echo s)"
if [[ -f "$WORK_DIR/lora/adapter_model.safetensors" && -f "$WORK_DIR/lora/trainer_state.json" ]]; then
  skip "$WORK_DIR/lora holds a trained adapter"
else
  train_eval=()
  [[ $TRAIN_EVAL_LIMIT == 0 ]] || train_eval=(--eval_task humaneval --eval_limit "$TRAIN_EVAL_LIMIT" --eval_max_new_tokens 256)
  $PY finetune.py --base_model "$BASE_MODEL" --data_path "$train_file" --output_dir "$WORK_DIR/lora" \
    --max_steps "$MAX_STEPS" --batch_size 16 --micro_batch_size 4 --cutoff_len 256 --learning_rate 3e-4 \
    --warmup_steps 5 --val_set_size 32 --eval_steps 10 --save_steps 20 --logging_steps 5 \
    --lora_target_modules '[q_proj,k_proj,v_proj,o_proj]' "${train_eval[@]}"
fi
done_in

stage "3/4 export: merge the adapter (transformers and llama.cpp formats)"
for kind in hf gguf; do
  folder="$WORK_DIR/export/$([[ $kind == hf ]] && echo hf_ckpt || echo gguf)"
  if [[ -d "$folder" && -n "$(ls -A "$folder")" ]]; then
    skip "$folder exists"
  else
    $PY export_checkpoint.py --base_model "$BASE_MODEL" --lora_weights "$WORK_DIR/lora" \
      --output_dir "$WORK_DIR/export" --checkpoint_type "$kind"
  fi
done
done_in

stage "4/4 evaluate: HumanEval pass@1 (greedy) on $EVAL_LIMIT problems, and $EVAL_TASK2 on $EVAL_LIMIT2, merged model"
if [[ -f "$WORK_DIR/eval/humaneval_results.json" ]]; then
  skip "$WORK_DIR/eval holds results"
else
  $PY evaluate.py --task humaneval --base_model "$WORK_DIR/export/hf_ckpt" --limit "$EVAL_LIMIT" \
    --max_new_tokens 256 --output_dir "$WORK_DIR/eval"
fi
# A second language: its problems file and toolchain must be here (else say how to get them).
if [[ $EVAL_TASK2 != none ]]; then
  if [[ -f "$WORK_DIR/eval/${EVAL_TASK2}_results.json" ]]; then
    skip "$WORK_DIR/eval holds $EVAL_TASK2 results"
  elif why=$($PY -c "
import sys
from utils.eval import multilingual as m
task, folder = sys.argv[1], sys.argv[2]
if task not in m.TASKS: sys.exit(f'{task} is not a HumanEval-X / MultiPL-E task')
if not m.default_problems_file(task, folder).is_file(): sys.exit(f'{m.default_problems_file(task, folder)} is missing (get it with: $PY data/download.py --benchmarks only)')
try: m.check_toolchain(m.TASKS[task][1], m.TASKS[task][0])
except Exception as error: sys.exit(str(error))
" "$EVAL_TASK2" "$BENCHMARKS_DIR" 2>&1); then
    $PY evaluate.py --task "$EVAL_TASK2" --benchmarks_dir "$BENCHMARKS_DIR" --base_model "$WORK_DIR/export/hf_ckpt" \
      --limit "$EVAL_LIMIT2" --max_new_tokens 256 --output_dir "$WORK_DIR/eval"
  else
    echo "   $EVAL_TASK2 not scored: $why"
  fi
fi
done_in

echo
echo "== done in $((SECONDS - job_start)) s. Where everything is:"
echo "   filtered data     $train_file   (counts, charts, report: $WORK_DIR/data/)"
echo "   LoRA adapter      $WORK_DIR/lora/   (loss curve: $WORK_DIR/lora/loss.png)"
echo "   merged model      $WORK_DIR/export/hf_ckpt/   llama.cpp: $WORK_DIR/export/gguf/"
score() { [[ -f "$1" ]] && $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"pass@1 {r['pass@1']:.3f} on {r['problems']} problems\")" "$1" || echo "not scored"; }
echo "   HumanEval         $(score "$WORK_DIR/eval/humaneval_results.json")   $WORK_DIR/eval/humaneval_results.json"
[[ $EVAL_TASK2 == none ]] || echo "   $EVAL_TASK2 $(printf '%*s' $((17 - ${#EVAL_TASK2})) '')$(score "$WORK_DIR/eval/${EVAL_TASK2}_results.json")   $WORK_DIR/eval/${EVAL_TASK2}_results.json"
echo "   web demo          $PY generate.py --base_model $WORK_DIR/export/hf_ckpt   then open http://127.0.0.1:7860"
echo
echo "== Use your model elsewhere (each export's chat template is the training prompt; README: Use your model elsewhere):"
echo "   transformers      pipeline(\"text-generation\", model=\"$WORK_DIR/export/hf_ckpt\")([{\"role\": \"user\", \"content\": \"...\"}])"
echo "   llama.cpp         llama-cli -m $WORK_DIR/export/gguf/ggml-model-f16.gguf -cnv --temp 0 -r \"### Instruction:\""
echo "   OpenAI API        llama-server -m $WORK_DIR/export/gguf/ggml-model-f16.gguf --jinja --port 8080   then POST /v1/chat/completions"
echo "   Ollama            cd $WORK_DIR/export/gguf && ollama create codeup -f Modelfile.f16 && ollama run codeup"
