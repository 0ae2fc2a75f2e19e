"""Export stage: merge a LoRA adapter into its base model and save it for transformers, PyTorch or llama.cpp.

    python export_checkpoint.py --lora_weights ./lora-codeup --export_dir export_checkpoint/codeup --checkpoint_type hf
    python export_checkpoint.py --lora_weights ./lora-codeup --export_dir export_checkpoint/codeup --checkpoint_type gguf

The merge works tensor by tensor, reading the base model shard by shard (never in 8-bit): each
adapted weight becomes W + scaling * B @ A, in float32, then the export dtype. Peak memory stays
near one shard plus the adapter. Everything is written into a temp folder beside the target and
renamed at the end, so a crash never leaves a half export that looks whole.

  hf       {export_dir}/hf_ckpt/: sharded safetensors, config (no quantization settings), tokenizer,
           generation config; loads with AutoModelForCausalLM and serves generate.py.
  pytorch  {export_dir}/ckpt/consolidated.00.pth + params.json in Meta's Llama layout.
  gguf     {export_dir}/gguf/ggml-model-{f32|f16|bf16}.gguf for llama.cpp (optionally quantized).
"""

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.model_loading import DEFAULT_BASE_MODEL, resolve_model_reference

CHECKPOINT_FOLDERS = {"hf": "hf_ckpt", "pytorch": "ckpt", "gguf": "gguf"}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
GGUF_SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
QUANTIZATIONS = {"q8_0": 7, "q4_k_m": 15}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


# ---- reading the base and the adapter --------------------------------------------------------

def base_folder(base_model: str) -> Path:
    """A local folder with the base's config and weights (a hub model is downloaded first)."""
    reference = resolve_model_reference(base_model)
    if Path(reference).is_dir():
        return Path(reference)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(reference, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"]))
    except Exception as error:
        raise CodeUpError(f"cannot download {base_model}: {str(error).splitlines()[0]}") from None


def weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CodeUpError(f"{folder} has no .safetensors weights (convert the base model to safetensors first)")
    return files


def read_adapter(lora_weights: str) -> tuple[dict, dict, dict]:
    """(adapter config, {base weight name: (A, B)}, {base weight name: full replacement tensor})."""
    folder = Path(lora_weights).expanduser()
    config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise CodeUpError(f"--lora_weights {folder}: expected adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise CodeUpError(f"{folder}: only plain LoRA adapters can be merged (found {config.get('peft_type')}, DoRA={config.get('use_dora')})")
    pairs, replacements = {}, {}
    with safe_open(str(weights_file), framework="pt") as adapter:
        for key in adapter.keys():
            name = re.sub(r"^base_model\.model\.", "", key)
            if ".lora_A." in name or ".lora_B." in name:
                module, part = re.match(r"(.*)\.lora_([AB])\.(?:[^.]+\.)?weight$", name).groups()
                pairs.setdefault(f"{module}.weight", {})[part] = adapter.get_tensor(key)
            elif ".modules_to_save." in name:
                replacements[name.replace(".modules_to_save.default", "")] = adapter.get_tensor(key)
            elif "lora_embedding" in name or "lora_magnitude" in name:
                raise CodeUpError(f"{folder}: {key} is not a linear LoRA weight; this adapter cannot be merged here")
    incomplete = [name for name, parts in pairs.items() if set(parts) != {"A", "B"}]
    if incomplete:
        raise CodeUpError(f"{folder}: the adapter lacks lora_A or lora_B for {incomplete[0]}")
    return config, {name: (parts["A"], parts["B"]) for name, parts in pairs.items()}, replacements


def lora_scaling(config: dict) -> float:
    rank, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank


def check_adapter_fits(pairs: dict, replacements: dict, shapes: dict[str, tuple]) -> None:
    """Every adapted module exists in the base, with the shapes the adapter expects."""
    for name, (a, b) in pairs.items():
        if name not in shapes:
            raise CodeUpError(f"the adapter changes {name}, which the base model does not have: wrong --base_model?")
        if (b.shape[0], a.shape[1]) != tuple(shapes[name]):
            raise CodeUpError(f"the adapter's {name} is {b.shape[0]}x{a.shape[1]} but the base's is "
                              f"{'x'.join(map(str, shapes[name]))}: wrong --base_model?")
    for name, tensor in replacements.items():
        if name in shapes and tuple(tensor.shape) != tuple(shapes[name]):
            raise CodeUpError(f"the adapter's full {name} has shape {tuple(tensor.shape)}, the base's {tuple(shapes[name])}")


def merged_tensors(files: list[Path], pairs: dict, replacements: dict, scaling: float, dtype: torch.dtype):
    """Yields (name, merged tensor in dtype), reading one base tensor at a time."""
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as shard:
            total += len(list(shard.keys()))
    with tqdm(total=total, desc="Merging", unit="tensor") as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    tensor = replacements.get(name)
                    if tensor is None:
                        tensor = shard.get_tensor(name)
                    if name in pairs:
                        a, b = pairs[name]
                        tensor = tensor.float() + scaling * (b.float() @ a.float())
                    yield name, tensor.to(dtype).contiguous()
                    bar.update(1)


def tensor_shapes(files: list[Path]) -> dict[str, tuple]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():
                shapes[name] = tuple(shard.get_slice(name).get_shape())
    return shapes


# ---- writers ---------------------------------------------------------------------------------

def parse_size(size: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not match:
        raise CodeUpError(f"--max_shard_size {size!r}: use a size such as 500MB or 2GB")
    return int(float(match.group(1)) * {"B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}[match.group(2)])


def write_hf(tensors, folder: Path, base: Path, config, dtype_name: str, max_shard_bytes: int):
    """Safetensors shards of at most max_shard_bytes (plus an index when there are several)."""
    shards, current, current_bytes, index = [], {}, 0, {}

    def flush():
        nonlocal current, current_bytes
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, str(folder / name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[name] = tensor
        current_bytes += size
    flush()
    if len(shards) == 1:
        os.replace(folder / shards[0][0], folder / "model.safetensors")
    else:
        total = sum((folder / name).stat().st_size for name, _ in shards)
        index = {"metadata": {"total_size": total}, "weight_map": {t: name for name, names in shards for t in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if (base / "generation_config.json").is_file():
        shutil.copy(base / "generation_config.json", folder / "generation_config.json")
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    if (base / "tokenizer.model").is_file():  # SentencePiece's own file, for llama.cpp's converter
        shutil.copy(base / "tokenizer.model", folder / "tokenizer.model")


def meta_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> Meta's and llama.cpp's (interleaved pairs), per head."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def hf_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse: Meta's interleaved layout -> HF's (what transformers' converter applies)."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


META_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]


def meta_name(name: str) -> str:
    for pattern, replacement in META_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    raise CodeUpError(f"{name} has no place in Meta's Llama layout (is the base model a Llama?)")


def write_pytorch(tensors, folder: Path, config):
    """consolidated.00.pth + params.json, Meta's names, Q/K back in the interleaved rotary layout."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = {}
    for name, tensor in tensors:
        if name.endswith("q_proj.weight"):
            tensor = meta_permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_permute(tensor, kv_heads)
        state[meta_name(name)] = tensor
    if "output.weight" not in state:  # tied embeddings: Meta's layout stores the output matrix too
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    torch.save(state, folder / "consolidated.00.pth")
    params = {
        "dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": heads, "n_kv_heads": kv_heads,
        "vocab_size": config.vocab_size, "norm_eps": config.rms_norm_eps, "rope_theta": rope_theta(config),
        "ffn_dim": config.intermediate_size, "max_seq_len": config.max_position_embeddings,
    }
    (folder / "params.json").write_text(json.dumps(params, indent=2))


def rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    return float(parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def write_gguf(tensors, folder: Path, base: Path, config, dtype_name: str) -> Path:
    """A llama.cpp GGUF file: llama metadata, the tokenizer, and tensors in llama.cpp's names and layout."""
    import gguf

    if config.model_type != "llama":
        raise CodeUpError(f"GGUF export supports Llama-architecture models, not {config.model_type}")
    path = folder / f"ggml-model-{GGUF_SUFFIX[dtype_name]}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama", use_temp_file=True)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(base.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16}[dtype_name])
    add_gguf_tokenizer(writer, base, config)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in tensors:
        if name.endswith("q_proj.weight"):
            tensor = meta_permute(tensor, heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_permute(tensor, kv_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise CodeUpError(f"{name} has no llama.cpp name")
        if tensor.dim() == 1 or dtype_name == "float32":
            tensor = tensor.float()  # llama.cpp keeps norms in float32
        if tensor.dtype == torch.bfloat16:
            writer.add_tensor(gguf_name, tensor.view(torch.int16).numpy(), raw_shape=tensor.shape,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(gguf_name, tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return path


def add_gguf_tokenizer(writer, base: Path, config) -> None:
    """SentencePiece Llama tokenizers (tokenizer.model) and GPT-2-style byte-level BPE ones."""
    import gguf

    if (base / "tokenizer.model").is_file():
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
        tokens, scores, types = [], [], []
        for i in range(processor.vocab_size()):
            tokens.append(processor.id_to_piece(i).encode("utf-8"))
            scores.append(processor.get_score(i))
            types.append(gguf.TokenType.UNKNOWN if processor.is_unknown(i) else gguf.TokenType.CONTROL
                         if processor.is_control(i) else gguf.TokenType.BYTE if processor.is_byte(i)
                         else gguf.TokenType.UNUSED if processor.is_unused(i) else gguf.TokenType.NORMAL)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_add_space_prefix(True)
    else:
        tokenizer_json = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
        model = tokenizer_json["model"]
        if model.get("type") != "BPE" or model.get("byte_fallback"):
            raise CodeUpError("GGUF export supports SentencePiece (tokenizer.model) and byte-level BPE tokenizers")
        vocab = dict(model["vocab"])
        special = {}
        for added in tokenizer_json.get("added_tokens", []):
            vocab[added["content"]] = added["id"]
            if added.get("special"):
                special[added["id"]] = True
        size = max(max(vocab.values()) + 1, config.vocab_size)
        tokens = [f"[PAD{i}]" for i in range(size)]
        types = [gguf.TokenType.UNUSED] * size
        for token, token_id in vocab.items():
            tokens[token_id] = token
            types[token_id] = gguf.TokenType.CONTROL if special.get(token_id) else gguf.TokenType.NORMAL
        merges = [" ".join(m) if isinstance(m, list) else m for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer_json))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    special_vocab = gguf.SpecialVocab(str(base), load_merges=False, n_vocab=config.vocab_size)
    special_vocab.add_to_gguf(writer)


def bpe_pre_tokenizer(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # SmolLM's: each digit alone, then GPT-2's rules
    raise CodeUpError(f"GGUF export: unknown byte-level pre-tokenizer {kinds}; convert the hf export with "
                      "llama.cpp's convert_hf_to_gguf.py instead")


def quantize_gguf(path: Path, quantization: str) -> Path:
    try:
        import llama_cpp
    except ImportError:
        raise CodeUpError("--quantize needs llama-cpp-python: pip install llama-cpp-python") from None
    target = path.with_name(f"ggml-model-{quantization}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZATIONS[quantization]
    if llama_cpp.llama_model_quantize(str(path).encode(), str(target).encode(), params) != 0:
        raise CodeUpError(f"llama.cpp could not quantize {path} to {quantization}")
    return target


# ---- the CLI ---------------------------------------------------------------------------------

def main(
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    export_dir: str = "export_checkpoint",
    checkpoint_type: str = "hf",
    dtype: str = "float16",
    max_shard_size: str = "2GB",
    quantize: str = "",
    overwrite: bool = False,
    lora_target_modules=None,
):
    """Merge --lora_weights into --base_model and export it.

    Args:
        base_model: the base the adapter was trained on: hub id, local HF folder, .gguf file, or smollm2-135m.
        lora_weights: the adapter folder from finetune.py (adapter_config.json + adapter_model.safetensors).
        export_dir: where the export goes: {export_dir}/hf_ckpt, /ckpt or /gguf.
        checkpoint_type: hf (transformers), pytorch (Meta's Llama layout) or gguf (llama.cpp).
        dtype: float16, bfloat16 or float32.
        max_shard_size: the largest safetensors shard of an hf export, e.g. 500MB or 2GB.
        quantize: gguf only: also write a q8_0 or q4_k_m file (needs llama-cpp-python).
        overwrite: replace an existing export of this type.
        lora_target_modules: accepted for compatibility; the modules are read from adapter_config.json.
    """
    if checkpoint_type not in CHECKPOINT_FOLDERS:
        raise CodeUpError(f"--checkpoint_type must be hf, pytorch or gguf, not {checkpoint_type!r}")
    if dtype not in DTYPES:
        raise CodeUpError(f"--dtype must be float16, bfloat16 or float32, not {dtype!r}")
    if quantize and (checkpoint_type != "gguf" or quantize not in QUANTIZATIONS):
        raise CodeUpError("--quantize takes q8_0 or q4_k_m, with --checkpoint_type gguf")
    if not lora_weights:
        raise CodeUpError("give the adapter to merge: --lora_weights DIR")
    max_shard_bytes = parse_size(max_shard_size)
    export = Path(export_dir).expanduser()
    target = export / CHECKPOINT_FOLDERS[checkpoint_type]
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CodeUpError(f"{target} exists and is not empty: pass --overwrite to replace it")

    adapter_config, pairs, replacements = read_adapter(lora_weights)
    if lora_target_modules:
        declared = set(parse_list(lora_target_modules))
        found = {name.split(".")[-2] for name in pairs}
        if declared != found:
            print(f"note: --lora_target_modules {sorted(declared)} ignored; the adapter adapts {sorted(found)}")
    base = base_folder(base_model)
    files = weight_files(base)
    shapes = tensor_shapes(files)
    check_adapter_fits(pairs, replacements, shapes)
    config = AutoConfig.from_pretrained(str(base))
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in shapes
    if tied and any(name in pairs or name in replacements for name in ("lm_head.weight", "model.embed_tokens.weight")):
        raise CodeUpError("the adapter changes the embeddings or lm_head of a model whose two are tied (one "
                          "matrix): merging that is not supported; train without them in --lora_target_modules")

    export.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=export, prefix=f".{target.name}-"))
    try:
        tensors = merged_tensors(files, pairs, replacements, lora_scaling(adapter_config), DTYPES[dtype])
        if checkpoint_type == "hf":
            write_hf(tensors, staging, base, config, dtype, max_shard_bytes)
        elif checkpoint_type == "pytorch":
            write_pytorch(tensors, staging, config)
        else:
            path = write_gguf(tensors, staging, base, config, dtype)
            if quantize:
                quantize_gguf(path, quantize)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Exported {base_model} + {lora_weights} ({checkpoint_type}, {dtype}) to {target}")


if __name__ == "__main__":
    run_cli(main)
