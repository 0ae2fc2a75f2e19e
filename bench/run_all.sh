#!/usr/bin/env bash
# Run every benchmark and rewrite bench/RESULTS.md with their tables and this machine's description.
#   bash bench/run_all.sh          (about 55 minutes on 2 cores; needs ../shared/data or --data_dir)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
out=bench/RESULTS.md.new
{
  echo "# Benchmark results"
  echo
  echo "Written by \`bash bench/run_all.sh\` on $(date -u +%Y-%m-%d). Each benchmark measures its baseline in the same run."
  echo
  echo "Machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GB memory;"
  echo "$($PY -c 'import platform, torch, transformers, peft; print(f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")');"
  echo "GPU: $($PY -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")')."
} > "$out"
for bench in bench_preprocess bench_finetune bench_generate bench_evaluate bench_export bench_rl bench_code_eval; do
  echo "== $bench" >&2
  {
    echo
    echo "## $bench"
    echo
    echo "Command: \`$PY bench/$bench.py\`"
    echo
    $PY "bench/$bench.py" 2> "bench/.$bench.log"
  } >> "$out"
done
mv "$out" bench/RESULTS.md
rm -f bench/.bench_*.log
echo "bench/RESULTS.md rewritten" >&2
