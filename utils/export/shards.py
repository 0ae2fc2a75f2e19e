"""A merged model written as a Hugging Face folder: safetensors shards streamed to disk tensor by
tensor (memory: one tensor, not a shard), its index, config, generation config and tokenizer."""

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.errors import CodeUpError


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

    def add(self, name: str, *, tensor: torch.Tensor) -> None:
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


def write_shards(tensors, *, folder: Path, max_shard_bytes: int) -> None:
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
        current.add(name, tensor=tensor)
    if current is not None:
        current.close()
    if len(shards) == 1:
        os.replace(folder / shards[0][0], folder / "model.safetensors")
    else:
        total = sum((folder / name).stat().st_size for name, _ in shards)
        index = {"metadata": {"total_size": total}, "weight_map": {t: name for name, names in shards for t in names}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@dataclass(frozen=True)
class HfFolder:
    """What a merged model's Hugging Face folder holds besides its tensors: the config (written
    without quantization settings, with the export's dtype), the base's generation config and
    SentencePiece model, and the tokenizer; shards of at most max_shard_bytes."""

    base: Path
    config: object
    dtype_name: str
    max_shard_bytes: int
    tokenizer: object

    def write(self, tensors, *, folder: Path) -> None:
        write_shards(tensors, folder=folder, max_shard_bytes=self.max_shard_bytes)
        config = self.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = self.dtype_name
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if (self.base / "generation_config.json").is_file():
            shutil.copy(self.base / "generation_config.json", folder / "generation_config.json")
        self.tokenizer.save_pretrained(str(folder))
        if (self.base / "tokenizer.model").is_file():  # SentencePiece's own file, for llama.cpp's converter
            shutil.copy(self.base / "tokenizer.model", folder / "tokenizer.model")
