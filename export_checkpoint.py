"""Export stage: merge a LoRA adapter into its base model and save it for transformers, llama.cpp,
Ollama or PyTorch, prompted as it was trained.

    python export_checkpoint.py --lora_weights ./lora-codeup --output_dir export_checkpoint/codeup --checkpoint_type hf
    python export_checkpoint.py --lora_weights ./lora-codeup --output_dir export_checkpoint/codeup --checkpoint_type gguf --quantize q4_k_m

The merge works tensor by tensor, reading the base model shard by shard (never in 8-bit): each
adapted weight becomes what PEFT computes (W + scaling * B @ A in float32; DoRA, lora_bias,
module copies, resized embeddings too), then the export dtype; each tensor is streamed into its
shard file. Peak memory stays near one tensor plus the adapter and the libraries. An adapter
tensor of a kind the merge does not know stops it (one line naming the tensor): a merge is exact
or refused. Everything is written into a temp folder beside the target and renamed at the end,
so a crash never leaves a half export that looks whole.

The exports' chat template is the training prompt (utils/prompter.py: chat_template), read from
the adapter's prompt_template.json (--prompt_template to choose another).

  hf         {output_dir}/hf_ckpt/: sharded safetensors, config (no quantization settings), tokenizer
             with the chat template, generation config; loads with AutoModelForCausalLM.
  gguf       {output_dir}/gguf/ggml-model-{f32|f16|bf16}.gguf by llama.cpp's own convert_hf_to_gguf.py
             (any architecture it supports), optionally quantized by llama.cpp (q8_0, q4_k_m, q5_k_m),
             and an Ollama Modelfile.{suffix} beside each GGUF.
  gguf-lora  {output_dir}/gguf-lora/: a GGUF of the base and the adapter as a GGUF LoRA
             (convert_lora_to_gguf.py), for llama-cli --lora / llama-cpp-python's lora_path.
  pytorch    {output_dir}/ckpt/consolidated.00.pth + params.json in Meta's Llama layout.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from utils.logs import logger, progress_bars_wanted  # first: before tqdm is imported, so that a log file gets no bars

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer

from utils.cli import parse_list, run_cli
from utils.errors import CodeUpError
from utils.files import read_json
from utils.precision import resolve_precision, torch_dtype
from utils.model_loading import DEFAULT_BASE_MODEL, load_tokenizer, resolve_model_reference
from utils.prompter import Prompter, chat_template, ollama_template, read_template_record, resolve_prompt_template

CHECKPOINT_FOLDERS = {"hf": "hf_ckpt", "pytorch": "ckpt", "gguf": "gguf", "gguf-lora": "gguf-lora"}
GGUF_SUFFIX = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}
QUANTIZATIONS = {"q8_0": 7, "q4_k_m": 15, "q5_k_m": 17}  # llama.cpp's LLAMA_FTYPE_MOSTLY_* numbers


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


class Adapter:
    """A PEFT LoRA adapter read for merging: every tensor in its file is understood, or refused.

    pairs         {base weight name: (A, B, scaling)}: W += scaling * B @ A (Linear) or its transpose
                  (Embedding: lora_embedding_A/B).
    biases        {base bias name: (lora_B.bias, scaling)}: b += scaling * lora_B.bias (lora_bias=True).
    magnitudes    {base weight name: m}: DoRA: W' = m / ||W + dW||_row * (W + dW).
    replacements  {base weight name: tensor}: full copies (modules_to_save, embeddings saved after
                  resizing); `wrapped` names those that PEFT keeps as a separate copy (modules_to_save,
                  LoRA on an embedding): on a model with tied embeddings only that module changes.
    """

    def __init__(self, folder: Path):
        config_file, weights_file = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_file.is_file() or not weights_file.is_file():
            raise CodeUpError(f"--lora_weights {folder}: expected adapter_config.json and adapter_model.safetensors")
        self.folder, self.config = folder, read_json(config_file, what="adapter config")
        config = self.config
        if config.get("peft_type", "LORA") != "LORA":
            raise CodeUpError(f"{folder}: a {config.get('peft_type')} adapter; only LoRA adapters (and DoRA) can be merged")
        for option in ("layer_replication", "target_parameters", "trainable_token_indices"):
            if config.get(option):
                raise CodeUpError(f"{folder}: adapter_config.json sets {option}, which cannot be merged here")
        self.dora = bool(config.get("use_dora"))
        self.modules_to_save = set(config.get("modules_to_save") or [])
        parts, bias_parts, self.magnitudes, self.replacements, self.wrapped = {}, {}, {}, {}, set()
        with safe_open(str(weights_file), framework="pt") as adapter:
            for key in adapter.keys():
                name = re.sub(r"^base_model\.model\.", "", key)
                if ".original_module." in name:
                    continue  # PEFT's copy of the module a modules_to_save copy replaces: unused once adapted
                tensor = adapter.get_tensor(key)
                if match := re.fullmatch(r"(.*)\.lora_([AB])(?:\.[^.]+)?\.weight", name):
                    parts.setdefault(match[1], {})[match[2]] = tensor
                elif match := re.fullmatch(r"(.*)\.lora_embedding_([AB])(?:\.[^.]+)?", name):
                    parts.setdefault(match[1], {})[match[2]] = tensor
                    self.wrapped.add(f"{match[1]}.weight")
                elif match := re.fullmatch(r"(.*)\.lora_B(?:\.[^.]+)?\.bias", name):
                    bias_parts[match[1]] = tensor
                elif match := re.fullmatch(r"(.*)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?", name):
                    self.magnitudes[f"{match[1]}.weight"] = tensor
                elif match := re.fullmatch(r"(.*?)(?:\.base_layer)?(?:\.modules_to_save(?:\.[^.]+)?)?\.(weight|bias)", name):
                    # A full copy: modules_to_save (saved under the module's own name) or an embedding
                    # saved because it was resized / adapted (save_embedding_layers).
                    module = match[1]
                    if ".base_layer" in name and f"{module}.weight" not in self.wrapped:
                        self.wrapped.add(f"{module}.weight")
                    self.replacements[f"{module}.{match[2]}"] = tensor
                    if module.rsplit(".", 1)[-1] in self.modules_to_save or module in self.modules_to_save:
                        self.wrapped.add(f"{module}.{match[2]}")
                else:
                    raise CodeUpError(f"{folder}: the adapter's tensor {key} is of a kind this merge does not know; refusing "
                                      "to export something that would differ from base + adapter")
        self.pairs, self.biases = {}, {}
        for module, found in parts.items():
            if set(found) != {"A", "B"}:
                raise CodeUpError(f"{folder}: the adapter lacks lora_A or lora_B for {module}")
            scaling = self.scaling(module, rank=found["A"].shape[0])
            self.pairs[f"{module}.weight"] = (found["A"], found["B"], scaling)
            if module in bias_parts:
                self.biases[f"{module}.bias"] = (bias_parts.pop(module), scaling)
        if bias_parts:
            raise CodeUpError(f"{folder}: the adapter has {next(iter(bias_parts))}.lora_B.bias without its lora_A/lora_B")
        stray = set(self.magnitudes) - set(self.pairs)
        if stray:
            raise CodeUpError(f"{folder}: the adapter has a DoRA magnitude for {stray.pop()} without its lora_A/lora_B")

    def scaling(self, module: str, *, rank: int) -> float:
        """alpha / r (or / sqrt(r) with rsLoRA), with the adapter's rank_pattern / alpha_pattern,
        matched to module names as PEFT matches them."""
        alpha_pattern = self.config.get("alpha_pattern") or {}
        # PEFT's get_pattern_key: the first pattern that matches the end of the module's name (copied,
        # as importing peft would cost this low-memory merge a few hundred MB).
        key = next((key for key in alpha_pattern if re.match(rf"(.*\.)?({key})$", module)), None)
        alpha = alpha_pattern[key] if key is not None else self.config.get("lora_alpha", rank)
        return alpha / rank ** 0.5 if self.config.get("use_rslora") else alpha / rank

    def changes(self) -> set[str]:
        return set(self.pairs) | set(self.biases) | set(self.replacements)

    def merge(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The merged value of the base tensor `name` (the base tensor itself when not adapted)."""
        if name in self.replacements:
            tensor = self.replacements[name]
        if name in self.biases:
            bias, scaling = self.biases[name]
            tensor = tensor.float() + scaling * bias.float()
        if name in self.pairs:
            a, b, scaling = self.pairs[name]
            delta = scaling * (b.float() @ a.float())
            if name in self.wrapped and delta.shape != tensor.shape:  # an Embedding: B @ A is (dim, vocab)
                delta = delta.T
            elif self.config.get("fan_in_fan_out"):
                delta = delta.T
            weight = tensor.float() + delta
            if name in self.magnitudes:  # DoRA: the magnitude over each output row's norm
                weight = (self.magnitudes[name].float() / torch.linalg.norm(weight, dim=1)).unsqueeze(1) * weight
            tensor = weight
        return tensor

    def check_fits(self, shapes: dict[str, tuple]) -> dict[str, int]:
        """Every adapted module exists in the base with the shapes the adapter expects. Returns the
        resized vocabularies {name: rows} of embeddings saved with more rows than the base has."""
        resized = {}
        for name, (a, b, _) in self.pairs.items():
            if name not in shapes:
                raise CodeUpError(f"the adapter changes {name}, which the base model does not have: wrong --base_model?")
            expected = tuple(shapes[name])
            found = (b.shape[0], a.shape[1])
            if found != expected and found[::-1] != expected:
                raise CodeUpError(f"the adapter's {name} is {found[0]}x{found[1]} but the base's is "
                                  f"{'x'.join(map(str, expected))}: wrong --base_model?")
        for name in self.biases:
            if name not in shapes:
                raise CodeUpError(f"the adapter's {name.removesuffix('.bias')}.lora_B.bias (lora_bias=True) needs a bias "
                                  f"in the base's {name.removesuffix('.bias')}, which has none: it cannot be merged")
        for name, tensor in self.replacements.items():
            if name not in shapes:
                raise CodeUpError(f"the adapter's full {name} has no place in the base model: wrong --base_model?")
            base_shape = tuple(shapes[name])
            if tuple(tensor.shape) == base_shape:
                continue
            if re.search(r"(embed_tokens|lm_head|wte|embed_in|embed_out)\.weight$", name) and tensor.shape[1:] == base_shape[1:]:
                resized[name] = tensor.shape[0]
                continue
            raise CodeUpError(f"the adapter's full {name} has shape {tuple(tensor.shape)}, the base's {base_shape}")
        if len(set(resized.values())) > 1:
            raise CodeUpError(f"the adapter's embeddings disagree on the vocabulary size: {resized}")
        return resized


def merged_tensors(files: list[Path], adapter: Adapter, dtype: torch.dtype, extra: dict | None = None):
    """Yields (name, merged tensor in dtype), reading one base tensor at a time; `extra` maps names
    the base file lacks to a function giving their merged value (an untied lm_head)."""
    total = sum(len(list(safe_open(str(path), framework="pt").keys())) for path in files) + len(extra or {})
    with tqdm(total=total, desc="Merging", unit="tensor") as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    yield name, adapter.merge(name, shard.get_tensor(name)).to(dtype).contiguous()
                    bar.update(1)
        for name, make in (extra or {}).items():
            yield name, make().to(dtype).contiguous()
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


SAFETENSORS_TYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                      torch.bool: "BOOL"}


class StreamingShard:
    """One safetensors file written tensor by tensor: each tensor's bytes go straight to a data file
    beside it, and the header (which must come first and list every tensor) is written in front at
    the end. Memory: one tensor, not a whole shard."""

    def __init__(self, path: Path):
        self.path, self.header, self.size = path, {}, 0
        self.data = open(path.with_name(f".{path.name}.data"), "wb")

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self.header[name] = {"dtype": SAFETENSORS_TYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self.size, self.size + raw.nbytes]}
        self.data.write(memoryview(raw))
        self.size += raw.nbytes

    def close(self) -> None:
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.header}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(self.path, "wb") as output, open(self.data.name, "rb") as data:
            output.write(len(header).to_bytes(8, "little") + header)
            shutil.copyfileobj(data, output, 16 * 2**20)
        os.remove(self.data.name)


def write_hf(tensors, folder: Path, base: Path, config, dtype_name: str, max_shard_bytes: int, tokenizer):
    """Safetensors shards of at most max_shard_bytes (plus an index when there are several)."""
    shards, current = [], None

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current is not None and current.header and current.size + size > max_shard_bytes:
            current.close()
            current = None
        if current is None:
            current = StreamingShard(folder / f"model-{len(shards) + 1:05d}.safetensors")
            shards.append((current.path.name, current.header))
        current.add(name, tensor)
    if current is not None:
        current.close()
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
    tokenizer.save_pretrained(str(folder))
    if (base / "tokenizer.model").is_file():  # SentencePiece's own file, for llama.cpp's converter
        shutil.copy(base / "tokenizer.model", folder / "tokenizer.model")


def meta_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (halves) -> Meta's and llama.cpp's (interleaved pairs), per head."""
    rows, columns = weight.shape
    return weight.reshape(heads, 2, rows // heads // 2, columns).transpose(1, 2).reshape(rows, columns)


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


# ---- llama.cpp: its own converters, from the llama-cpp-python sdist (setup.sh) -------------------

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


def convert_to_gguf(hf_folder: Path, target: Path, dtype_name: str) -> Path:
    """A merged HF folder -> one GGUF file, through llama.cpp's convert_hf_to_gguf.py (which reads
    the safetensors lazily, so memory stays near one tensor)."""
    run_llama_cpp_script("convert_hf_to_gguf.py", hf_folder, "--outfile", target, "--outtype", GGUF_SUFFIX[dtype_name])
    return target


def quantize_gguf(path: Path, quantization: str) -> Path:
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


def write_modelfile(gguf_path: Path, template: dict | None, tokenizer, *, adapter_path: Path | None = None) -> Path:
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


# ---- the CLI ---------------------------------------------------------------------------------

def export_tokenizer(base: Path, adapter: Adapter, vocab_rows: int | None, template: dict | None):
    """The tokenizer the adapter was trained with, its chat template the training prompt.

    Its tokens: the adapter folder's own tokenizer when it has one (tokens added in training), else
    the base's, plus the pad token finetune.py adds when the base has none, if the adapter's
    resized embeddings say training had it."""
    if (adapter.folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(adapter.folder))
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        if vocab_rows is not None and vocab_rows > len(tokenizer):
            tokenizer = load_tokenizer(str(base))  # finetune.py's tokenizer: a pad token added
    if vocab_rows is not None and len(tokenizer) > vocab_rows:
        raise CodeUpError(f"the adapter's embeddings have {vocab_rows} rows but its tokenizer has {len(tokenizer)} "
                          "tokens: save the training tokenizer into the adapter folder")
    if template is not None:  # None: a chat-tuned adapter keeps the base's own chat template
        tokenizer.chat_template = chat_template(template)
    return tokenizer


def plan_embeddings(adapter: Adapter, shapes: dict, config) -> dict:
    """Tied embeddings (one matrix for input and output): PEFT changes only the module it wraps
    (modules_to_save, a LoRA on the embedding), so the merged model unties them and stores both;
    embeddings saved whole (after resizing) change both and stay tied. Returns the extra tensors
    to write ({"lm_head.weight": function} when untying)."""
    embed = next((name for name in shapes if name.endswith("embed_tokens.weight")), None)
    tied = getattr(config, "tie_word_embeddings", False) and "lm_head.weight" not in shapes and embed is not None
    if not tied:
        return {}
    shapes["lm_head.weight"] = shapes[embed]  # what the adapter's lm_head must fit
    touched = adapter.changes() & {embed, "lm_head.weight"}
    if not touched:
        return {}
    # Changed through the shared matrix (whole tensors saved after resizing, equal if both saved):
    # the two stay one. Anything PEFT wraps as its own module: untie.
    whole = {name: adapter.replacements[name] for name in touched if name in adapter.replacements and name not in adapter.wrapped}
    if not touched & (adapter.wrapped | set(adapter.pairs) | set(adapter.biases)) and (
            len(whole) < 2 or torch.equal(whole[embed], whole["lm_head.weight"])):
        if "lm_head.weight" in whole:
            adapter.replacements[embed] = adapter.replacements.pop("lm_head.weight")
        return {}
    config.tie_word_embeddings = False
    if getattr(config, "text_config", None) is not None:
        config.text_config.tie_word_embeddings = False
    files = {}

    def untied_head():
        """What the model's output layer computed: the shared matrix as loaded (a whole saved
        embedding replaces it), then the adapter's own lm_head copy or LoRA."""
        if embed in whole:
            shared = whole[embed]
        else:
            with safe_open(str(files["embed"]), framework="pt") as shard:
                shared = shard.get_tensor(embed)
        return adapter.merge("lm_head.weight", shared)

    return {"lm_head.weight": untied_head, "_embed_name": embed, "_files": files}


def main(
    base_model: str = DEFAULT_BASE_MODEL,
    lora_weights: str = "",
    output_dir: str = "export_checkpoint",
    checkpoint_type: str = "hf",
    precision: str = "float16",
    max_shard_size: str = "2GB",
    quantize="",
    prompt_template: str | None = None,
    overwrite: bool = False,
    lora_target_modules=None,
):
    """Merge --lora_weights into --base_model and export it.

    Args:
        base_model: the base the adapter was trained on: hub id, local HF folder, .gguf file, or smollm2-135m.
        lora_weights: the adapter folder from finetune.py (adapter_config.json + adapter_model.safetensors).
        output_dir: where the export goes: {output_dir}/hf_ckpt, /ckpt, /gguf or /gguf-lora.
        checkpoint_type: hf (transformers), pytorch (Meta's Llama layout), gguf (llama.cpp, merged) or
            gguf-lora (llama.cpp: a GGUF of the base plus the adapter as a GGUF LoRA).
        precision: the exported weights' dtype: float16, bfloat16 or float32 (auto: float16; see the
            precision table in docs/hardware.md).
        max_shard_size: the largest safetensors shard of an hf export, e.g. 500MB or 2GB.
        quantize: gguf only: also write quantized files, e.g. q4_k_m or q8_0,q4_k_m,q5_k_m (llama.cpp's
            quantizer, through llama-cpp-python).
        prompt_template: the prompt the export's chat template renders; default: the one the adapter
            was trained with (prompt_template.json in the adapter), else alpaca. Another one warns.
        overwrite: replace an existing export of this type.
        lora_target_modules: accepted for compatibility; the modules are read from adapter_config.json.
    """
    if checkpoint_type not in CHECKPOINT_FOLDERS:
        raise CodeUpError(f"--checkpoint_type must be hf, pytorch, gguf or gguf-lora, not {checkpoint_type!r}")
    # utils/precision.py decides (auto = float16 for exports); any spelling of a precision works
    dtype = str(torch_dtype(resolve_precision(precision, stage="export", device="cpu"))).removeprefix("torch.")
    quantizations = parse_list(quantize) if quantize else []
    if quantizations and (checkpoint_type != "gguf" or set(quantizations) - set(QUANTIZATIONS)):
        raise CodeUpError(f"--quantize takes {', '.join(QUANTIZATIONS)} (comma-separated), with --checkpoint_type gguf")
    if not lora_weights:
        raise CodeUpError("give the adapter to merge: --lora_weights DIR")
    max_shard_bytes = parse_size(max_shard_size)
    export = Path(output_dir).expanduser()
    target = export / CHECKPOINT_FOLDERS[checkpoint_type]
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CodeUpError(f"{target} exists and is not empty: pass --overwrite to replace it")

    adapter = Adapter(Path(lora_weights).expanduser())
    record = read_template_record(lora_weights)
    template = resolve_prompt_template(prompt_template, lora_weights)
    if lora_target_modules:
        declared = set(parse_list(lora_target_modules))
        found = {name.split(".")[-2] for name in adapter.pairs}
        if declared != found:
            logger.warning(f"--lora_target_modules {sorted(declared)} ignored; the adapter adapts {sorted(found)}")
    base = base_folder(base_model)
    files = weight_files(base)
    shapes = tensor_shapes(files)
    config = AutoConfig.from_pretrained(str(base))
    extra = plan_embeddings(adapter, shapes, config)
    embed_name, extra_files = extra.pop("_embed_name", None), extra.pop("_files", {})
    if embed_name:
        extra_files["embed"] = next(path for path in files if embed_name in safe_open(str(path), framework="pt").keys())
    vocab_rows = set(adapter.check_fits(shapes).values())
    vocab_rows = vocab_rows.pop() if vocab_rows else None
    if vocab_rows is not None:
        config.vocab_size = vocab_rows
        if getattr(config, "text_config", None) is not None:
            config.text_config.vocab_size = vocab_rows
    tokenizer = export_tokenizer(base, adapter, vocab_rows, template)

    export.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=export, prefix=f".{target.name}-"))
    try:
        if checkpoint_type == "hf":
            tensors = merged_tensors(files, adapter, getattr(torch, dtype), extra)
            write_hf(tensors, staging, base, config, dtype, max_shard_bytes, tokenizer)
        elif checkpoint_type == "pytorch":
            write_pytorch(merged_tensors(files, adapter, getattr(torch, dtype), extra), staging, config)
        elif checkpoint_type == "gguf":
            # Merged tensor by tensor into a plain HF folder, then llama.cpp's converter reads it lazily.
            merged = staging / ".merged-hf"
            merged.mkdir()
            write_hf(merged_tensors(files, adapter, getattr(torch, dtype), extra), merged, base, config, dtype, max_shard_bytes, tokenizer)
            path = convert_to_gguf(merged, staging / f"ggml-model-{GGUF_SUFFIX[dtype]}.gguf", dtype)
            shutil.rmtree(merged)
            write_modelfile(path, template, tokenizer)
            bars = bool(quantizations) and progress_bars_wanted()
            for quantization in tqdm(quantizations, desc="Quantizing", unit="file", disable=not bars):
                write_modelfile(quantize_gguf(path, quantization), template, tokenizer)
        else:
            write_gguf_lora(adapter, base, files, config, staging, dtype, max_shard_bytes, tokenizer, template, bool(extra))
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    prompt = "the base's own chat template" if template is None else (
        f"the {record['name']!r} training prompt" if record and prompt_template is None else "the prompt template given")
    print(f"Exported {base_model} + {lora_weights} ({checkpoint_type}, {dtype}) to {target}; chat template: {prompt}")


def write_gguf_lora(adapter: Adapter, base: Path, files, config, folder: Path, dtype: str, max_shard_bytes: int,
                    tokenizer, template, untied: bool) -> None:
    """A GGUF of the base (its chat template the training prompt) and the adapter as a GGUF LoRA
    (llama.cpp's convert_lora_to_gguf.py), for `llama-cli -m base --lora adapter` / lora_path."""
    if adapter.dora or adapter.biases or adapter.replacements or untied:
        raise CodeUpError("--checkpoint_type gguf-lora takes plain LoRA adapters (llama.cpp's LoRA has no DoRA, "
                          "lora_bias or full module copies): export --checkpoint_type gguf instead")
    plain_base = folder / ".base-hf"
    plain_base.mkdir()
    no_adapter = Adapter.__new__(Adapter)
    no_adapter.pairs, no_adapter.biases, no_adapter.replacements, no_adapter.magnitudes, no_adapter.wrapped = {}, {}, {}, {}, set()
    no_adapter.config = {}
    write_hf(merged_tensors(files, no_adapter, getattr(torch, dtype)), plain_base, base, config, dtype, max_shard_bytes, tokenizer)
    base_gguf = convert_to_gguf(plain_base, folder / f"base-{GGUF_SUFFIX[dtype]}.gguf", dtype)
    lora_gguf = folder / f"lora-{GGUF_SUFFIX[dtype]}.gguf"
    run_llama_cpp_script("convert_lora_to_gguf.py", adapter.folder, "--base", plain_base, "--outfile", lora_gguf,
                         "--outtype", GGUF_SUFFIX[dtype])
    shutil.rmtree(plain_base)
    write_modelfile(base_gguf, template, tokenizer, adapter_path=lora_gguf)


if __name__ == "__main__":
    run_cli(main, aliases={"export_dir": "output_dir", "dtype": "precision"})
