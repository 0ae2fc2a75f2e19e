"""The base and the adapter, read for merging: every adapter tensor understood or refused, and the
merged model produced one tensor at a time (peak memory near one tensor plus the adapter)."""

import re
from pathlib import Path

import utils.logs  # noqa: F401  (first: before tqdm is imported, so that a log file gets no bars)

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from utils.errors import CodeUpError
from utils.files import read_json
from utils.model_loading import resolve_model_reference


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


def tensor_shapes(files: list[Path]) -> dict[str, tuple]:
    shapes = {}
    for path in files:
        with safe_open(str(path), framework="pt") as shard:
            for name in shard.keys():
                shapes[name] = tuple(shard.get_slice(name).get_shape())
    return shapes


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

    @classmethod
    def empty(cls) -> "Adapter":
        """An adapter that changes nothing: merging through it gives the base's own tensors (the base
        GGUF of a gguf-lora export)."""
        adapter = cls.__new__(cls)
        adapter.pairs, adapter.biases, adapter.replacements, adapter.magnitudes, adapter.wrapped = {}, {}, {}, {}, set()
        adapter.config = {}
        return adapter

    def scaling(self, module: str, *, rank: int) -> float:
        """alpha / r (or / sqrt(r) with rsLoRA), with the adapter's rank_pattern / alpha_pattern,
        matched to module names as PEFT matches them."""
        alpha_pattern = self.config.get("alpha_pattern") or {}
        # PEFT's get_pattern_key: the first pattern that matches the end of the module's name (copied,
        # as importing peft would add its own memory to this low-memory merge: bench/RESULTS.md).
        key = next((key for key in alpha_pattern if re.match(rf"(.*\.)?({key})$", module)), None)
        alpha = alpha_pattern[key] if key is not None else self.config.get("lora_alpha", rank)
        return alpha / rank ** 0.5 if self.config.get("use_rslora") else alpha / rank

    def changes(self) -> set[str]:
        return set(self.pairs) | set(self.biases) | set(self.replacements)

    def merge(self, name: str, *, tensor: torch.Tensor) -> torch.Tensor:
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


def merged_tensors(files: list[Path], *, adapter: Adapter, dtype: torch.dtype, extra: dict | None = None):
    """Yields (name, merged tensor in dtype), reading one base tensor at a time; `extra` maps names
    the base file lacks to a function giving their merged value (an untied lm_head)."""
    total = sum(len(list(safe_open(str(path), framework="pt").keys())) for path in files) + len(extra or {})
    with tqdm(total=total, desc="Merging", unit="tensor") as bar:
        for path in files:
            with safe_open(str(path), framework="pt") as shard:
                for name in shard.keys():
                    yield name, adapter.merge(name, tensor=shard.get_tensor(name)).to(dtype).contiguous()
                    bar.update(1)
        for name, make in (extra or {}).items():
            yield name, make().to(dtype).contiguous()
            bar.update(1)


def plan_embeddings(adapter: Adapter, *, shapes: dict, config, files: list[Path]) -> dict:
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
    embed_file = next(path for path in files if embed in safe_open(str(path), framework="pt").keys())

    def untied_head():
        """What the model's output layer computed: the shared matrix as loaded (a whole saved
        embedding replaces it), then the adapter's own lm_head copy or LoRA."""
        if embed in whole:
            shared = whole[embed]
        else:
            with safe_open(str(embed_file), framework="pt") as shard:
                shared = shard.get_tensor(embed)
        return adapter.merge("lm_head.weight", tensor=shared)

    return {"lm_head.weight": untied_head}
