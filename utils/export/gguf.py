"""llama.cpp's formats through its own converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py,
from the llama-cpp-python sdist that setup.sh installs) and quantizer, and an Ollama Modelfile
beside each GGUF."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from utils.logs import progress_bars_wanted  # first: before tqdm is imported, so that a log file gets no bars

from tqdm.auto import tqdm

from utils.errors import CodeUpError
from utils.export.adapters import Adapter
from utils.export.shards import HfFolder
from utils.prompter import Prompter, ollama_template

GGUF_SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
QUANTIZATIONS = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


def llama_cpp_tools() -> Path:
    """The folder with llama.cpp's convert_hf_to_gguf.py, convert_lora_to_gguf.py and gguf-py."""
    folder = Path(os.environ.get("CODEUP_LLAMA_CPP") or Path(sys.prefix) / "share" / "codeup-llama.cpp")
    if not (folder / "convert_hf_to_gguf.py").is_file():
        raise CodeUpError(f"llama.cpp's converter is not in {folder}: run `bash setup.sh` (it installs it from the "
                          "llama-cpp-python source distribution), or set CODEUP_LLAMA_CPP to a llama.cpp checkout")
    return folder


def run_llama_cpp_script(script: str, *arguments) -> None:
    """Runs one of llama.cpp's Python converters (with its own gguf-py, which it puts first on its path)."""
    command = [sys.executable, str(llama_cpp_tools() / script), *map(str, arguments)]
    environment = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        reason = next((line for line in reversed(lines) if "Error" in line or "error" in line), lines[-1] if lines else "")
        raise CodeUpError(f"llama.cpp's {script} failed: {reason.strip()}")


def convert_to_gguf(hf_folder: Path, *, target: Path, dtype_name: str) -> Path:
    """A merged HF folder -> one GGUF file, through llama.cpp's convert_hf_to_gguf.py (which reads
    the safetensors lazily, so memory stays near one tensor)."""
    run_llama_cpp_script("convert_hf_to_gguf.py", hf_folder, "--outfile", target, "--outtype", GGUF_SUFFIX[dtype_name])
    return target


def quantize_gguf(path: Path, *, quantization: str) -> Path:
    """llama.cpp's quantizer (through llama-cpp-python's binding of llama_model_quantize)."""
    try:
        import llama_cpp
    except ImportError as error:
        raise CodeUpError("--quantize needs llama-cpp-python: bash setup.sh --dev (or pip install llama-cpp-python)") from error
    target = path.with_name(f"ggml-model-{quantization}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quantization]
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(path).encode(), str(target).encode(), params) != 0:
        raise CodeUpError(f"llama.cpp could not quantize {path} to {quantization}")
    return target


def write_modelfile(gguf_path: Path, *, template: dict | None, tokenizer, adapter_path: Path | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF: `ollama create NAME -f THIS` gives a model prompted as it
    was trained (the TEMPLATE renders what the chat template renders; the section headers stop it).
    A chat-tuned model (template None) keeps the GGUF's own chat template, which Ollama reads."""
    lines = [f"FROM ./{gguf_path.name}"]
    if adapter_path is not None:
        lines.append(f"ADAPTER ./{adapter_path.name}")
    if template is not None:
        text = ollama_template(template, eos_token=tokenizer.eos_token or "")
        if '"""' in text:
            raise CodeUpError('the prompt template contains """, which an Ollama Modelfile cannot hold')
        lines.append(f'TEMPLATE """{text}"""')
        for header in Prompter(template).section_headers:
            lines.append(f"PARAMETER stop {json.dumps(header)}")
    if tokenizer.eos_token:
        lines.append(f"PARAMETER stop {json.dumps(tokenizer.eos_token)}")
    path = gguf_path.with_name(f"Modelfile.{gguf_path.stem.rsplit('-', 1)[-1]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_gguf(tensors, *, folder: Path, hf: HfFolder, template: dict | None, quantizations: list[str]) -> None:
    """ggml-model-{dtype}.gguf of the merged tensors, the quantized files asked for, and a Modelfile
    beside each. The tensors go into a plain HF folder first, which llama.cpp's converter reads lazily."""
    merged = folder / ".merged-hf"
    merged.mkdir()
    hf.write(tensors, folder=merged)
    path = convert_to_gguf(merged, target=folder / f"ggml-model-{GGUF_SUFFIX[hf.dtype_name]}.gguf",
                           dtype_name=hf.dtype_name)
    shutil.rmtree(merged)
    write_modelfile(path, template=template, tokenizer=hf.tokenizer)
    bars = bool(quantizations) and progress_bars_wanted()
    for quantization in tqdm(quantizations, desc="Quantizing", unit="file", disable=not bars):
        write_modelfile(quantize_gguf(path, quantization=quantization), template=template, tokenizer=hf.tokenizer)


def write_gguf_lora(adapter: Adapter, *, base_tensors, folder: Path, hf: HfFolder, template: dict | None,
                    untied: bool) -> None:
    """A GGUF of the base (its chat template the training prompt) and the adapter as a GGUF LoRA
    (llama.cpp's convert_lora_to_gguf.py), for `llama-cli -m base --lora adapter` / lora_path."""
    if adapter.dora or adapter.biases or adapter.replacements or untied:
        raise CodeUpError("--checkpoint_type gguf-lora takes plain LoRA adapters (llama.cpp's LoRA has no DoRA, "
                          "lora_bias or full module copies): export --checkpoint_type gguf instead")
    plain_base = folder / ".base-hf"
    plain_base.mkdir()
    hf.write(base_tensors, folder=plain_base)
    suffix = GGUF_SUFFIX[hf.dtype_name]
    base_gguf = convert_to_gguf(plain_base, target=folder / f"base-{suffix}.gguf", dtype_name=hf.dtype_name)
    lora_gguf = folder / f"lora-{suffix}.gguf"
    run_llama_cpp_script("convert_lora_to_gguf.py", adapter.folder, "--base", plain_base, "--outfile", lora_gguf,
                         "--outtype", suffix)
    shutil.rmtree(plain_base)
    write_modelfile(base_gguf, template=template, tokenizer=hf.tokenizer, adapter_path=lora_gguf)
