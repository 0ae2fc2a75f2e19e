"""A merged Llama in Meta's own layout: consolidated.00.pth + params.json, Meta's tensor names, Q/K
back in the interleaved rotary layout."""

import json
import re
from pathlib import Path

import torch

from utils.errors import CodeUpError


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


def write_pytorch(tensors, *, folder: Path, config) -> None:
    """consolidated.00.pth + params.json, Meta's names, Q/K back in the interleaved rotary layout."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    state = {}
    for name, tensor in tensors:
        if name.endswith("q_proj.weight"):
            tensor = meta_permute(tensor, heads=heads)
        elif name.endswith("k_proj.weight"):
            tensor = meta_permute(tensor, heads=kv_heads)
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
