"""GPU memory of LoRA training, by arithmetic: what docs/hardware.md's tables are computed from.

    python bench/memory_arithmetic.py            # prints the table for Llama-2-7B at 16 x 512 tokens

The activation part (`saved_activation_bytes`) counts what one Llama-style decoder layer keeps
for the backward pass with a frozen base in a 16-bit dtype and PEFT's LoRA adapters (fp32, as PEFT
makes them); tests/test_memory_arithmetic.py checks it against the bytes a real layer saves on a
CPU. The rest is sizes: weights (8-bit: 1 byte a parameter; 4-bit NF4 with double quantization:
about 0.53; embeddings and output head upcast to fp32 by prepare_model_for_kbit_training), LoRA
weights + gradients + AdamW states (16 bytes a trainable parameter), and the loss: the logits of
one chunk of tokens at a time (utils/train/loss.py), not of the whole micro-batch.
"""

GIB = 2**30

LLAMA_2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000)


def saved_activation_bytes(*, hidden, intermediate, heads, kv_heads, batch, seq_len, lora_r, lora_targets,
                           lora_dropout, dtype_bytes=2):
    """Bytes one decoder layer saves for backward (activation checkpointing off).

    Per token: the two RMSNorms keep their fp32 input (+ one rsqrt); attention keeps q, k, v and
    its output (+ a log-sum-exp per head); the SwiGLU MLP keeps gate, act(gate) and up; each LoRA
    target keeps its own fp32 copy of its input (twice that with dropout: the dropped copy and
    the mask) and its rank-r fp32 intermediate. Per row: the rotary cos/sin tables.
    """
    head_dim = hidden // heads
    kv_dim = kv_heads * head_dim
    per_token = (
        2 * (4 * hidden + 4)
        + dtype_bytes * (2 * hidden + 2 * kv_dim) + 4 * heads
        + 3 * dtype_bytes * intermediate
    )
    in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden,
                   "gate_proj": hidden, "up_proj": hidden, "down_proj": intermediate}
    for target in lora_targets:
        per_token += (8 if lora_dropout else 4) * in_features[target] + 4 * lora_r
    return batch * seq_len * per_token + 2 * dtype_bytes * head_dim * seq_len


def training_memory(*, model=LLAMA_2_7B, bits, checkpointing, batch=16, seq_len=512, lora_r=16,
                    lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_dropout=0.05) -> dict:
    """GiB of each part, and the total, for LoRA on a quantized base."""
    hidden, intermediate, layers, vocab = model["hidden"], model["intermediate"], model["layers"], model["vocab"]
    kv_dim = model["kv_heads"] * hidden // model["heads"]
    linear = layers * (hidden * (hidden + 2 * kv_dim + hidden) + 3 * hidden * intermediate)
    weights = linear * (1 if bits == 8 else 0.53) + 2 * vocab * hidden * 4  # embeddings + head in fp32
    in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden,
                   "gate_proj": hidden, "up_proj": hidden, "down_proj": intermediate}
    out_features = {**{name: hidden for name in in_features}, "k_proj": kv_dim, "v_proj": kv_dim,
                    "gate_proj": intermediate, "up_proj": intermediate}
    lora_parameters = layers * sum(lora_r * (in_features[t] + out_features[t]) for t in lora_targets)
    layer = saved_activation_bytes(hidden=hidden, intermediate=intermediate, heads=model["heads"],
                                   kv_heads=model["kv_heads"], batch=batch, seq_len=seq_len, lora_r=lora_r,
                                   lora_targets=lora_targets, lora_dropout=lora_dropout)
    tokens = batch * seq_len
    if checkpointing:  # each layer's fp32 input (PEFT upcasts the residual stream), one layer recomputed
        activations = layers * tokens * hidden * 4 + layer
    else:
        activations = layers * layer
    # finetune.py's loss (utils/train/loss.py) holds the logits of one chunk of tokens at a time (fp32,
    # the head's 16-bit output and the 16-bit gradient: 8 bytes an element), and the gradient of
    # the hidden states plus the float32 copy of them that mixed precision returns. transformers'
    # own loss would hold 2 * tokens * vocab * 4 (fp32 logits and their gradient) and more.
    chunk_tokens = min(tokens, max(16, 2**25 // vocab))
    logits = chunk_tokens * vocab * 8 + tokens * hidden * (2 + 4)
    parts = {"weights": weights, "LoRA + AdamW": 16 * lora_parameters, "activations": activations, "logits": logits}
    parts = {name: value / GIB for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def main():
    print("| Llama-2-7B, LoRA r=16 q/k/v/o, 16 x 512 tokens | weights | LoRA + AdamW | activations | logits | total (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for bits in (8, 4):
        for checkpointing in (False, True):
            parts = training_memory(bits=bits, checkpointing=checkpointing)
            print(f"| {bits}-bit base, checkpointing {'on' if checkpointing else 'off'} | "
                  + " | ".join(f"{parts[name]:.1f}" for name in ("weights", "LoRA + AdamW", "activations", "logits", "total"))
                  + " |")


if __name__ == "__main__":
    main()
