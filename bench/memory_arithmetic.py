"""GPU memory of LoRA training, by arithmetic: what docs/hardware.md's tables are computed from.

    python bench/memory_arithmetic.py            # prints the table for Llama-2-7B at 16 x 512 tokens
    python bench/memory_arithmetic.py --sharding # then the per-GPU peaks of 7B-70B on 1/2/4/8 GPUs (FSDP)

The activation part (`saved_activation_bytes`) counts what one Llama-style decoder layer keeps
for the backward pass with a frozen base in a 16-bit dtype and PEFT's LoRA adapters (fp32, as PEFT
makes them); tests/test_memory_arithmetic.py checks it against the bytes a real layer saves on a
CPU. The rest is sizes: weights (8-bit: 1 byte a parameter; 4-bit NF4 with double quantization:
about 0.53; embeddings and output head upcast to fp32 by prepare_model_for_kbit_training), LoRA
weights + gradients + AdamW states (16 bytes a trainable parameter), and the loss: the logits of
one chunk of tokens at a time (utils/train/loss.py), not of the whole micro-batch.

`sharded_training_memory` adds a bf16 base and FSDP's full sharding over several GPUs (what
docs/hardware.md's "What fits where" table and the README's hardware section show; the tests
check both tables against it).
"""

import argparse

GIB = 2**30

LLAMA_2_7B = dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=32, vocab=32000)
LLAMA_2_13B = dict(hidden=5120, intermediate=13824, heads=40, kv_heads=40, layers=40, vocab=32000)
CODE_LLAMA_34B = dict(hidden=8192, intermediate=22016, heads=64, kv_heads=8, layers=48, vocab=32000)
QWEN2_5_CODER_32B = dict(hidden=5120, intermediate=27648, heads=40, kv_heads=8, layers=64, vocab=152064)
LLAMA_2_70B = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=80, vocab=32000)
# The shapes of the sharding table, smallest first (their config.json files; Qwen2.5-Coder-32B
# unties its output head from the embeddings, as the Llamas do, so both count here).
MODELS = {"Llama-2-7B": LLAMA_2_7B, "Llama-2-13B": LLAMA_2_13B, "Qwen2.5-Coder-32B": QWEN2_5_CODER_32B,
          "Code Llama 34B": CODE_LLAMA_34B, "Llama-2-70B": LLAMA_2_70B}

# What a process needs beyond the tensors counted here: the CUDA context (about 0.5 GiB with
# torch's kernels loaded) and the caching allocator's unused blocks. bench/bench_gpu.py's peaks
# (max_memory_allocated) leave both out, so the card must hold them on top. Under FSDP, NCCL's
# communicator buffers come on top of that.
CUDA_OVERHEAD_GIB = 1.0
NCCL_OVERHEAD_GIB = 0.5

# What a process may allocate on the common card sizes, rounded down from what torch reports as
# a card's total memory: 24 GB (A10 and L4 report 22.5 GiB, RTX 3090/4090 24), 40 GB (A100 40GB,
# 39.4), 48 GB (L40S and A40 45.0, RTX A6000 47.5), 80 GB (H100 and A100 80GB, 79.2).
CARDS = (("24 GB", 22.0), ("40 GB", 39.0), ("48 GB", 44.5), ("80 GB", 79.0))

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the paper's recipe, r=16


def _shapes(model, lora_r, lora_targets):
    """Frozen linear parameters of all decoder layers, and trainable LoRA parameters (all layers)."""
    hidden, intermediate, layers = model["hidden"], model["intermediate"], model["layers"]
    kv_dim = model["kv_heads"] * hidden // model["heads"]
    linear = layers * (hidden * (hidden + 2 * kv_dim + hidden) + 3 * hidden * intermediate)
    in_features = {"q_proj": hidden, "k_proj": hidden, "v_proj": hidden, "o_proj": hidden,
                   "gate_proj": hidden, "up_proj": hidden, "down_proj": intermediate}
    out_features = {**{name: hidden for name in in_features}, "k_proj": kv_dim, "v_proj": kv_dim,
                    "gate_proj": intermediate, "up_proj": intermediate}
    lora_parameters = layers * sum(lora_r * (in_features[t] + out_features[t]) for t in lora_targets)
    return linear, lora_parameters


def _activation_bytes(*, model, checkpointing, residual_bytes, batch, seq_len, lora_r, lora_targets, lora_dropout):
    """Saved activations of the whole model for one micro-batch: every layer's, or with checkpointing
    each layer's input (the residual stream's dtype) plus the one layer being recomputed."""
    layer = saved_activation_bytes(hidden=model["hidden"], intermediate=model["intermediate"], heads=model["heads"],
                                   kv_heads=model["kv_heads"], batch=batch, seq_len=seq_len, lora_r=lora_r,
                                   lora_targets=lora_targets, lora_dropout=lora_dropout)
    if checkpointing:
        return model["layers"] * batch * seq_len * model["hidden"] * residual_bytes + layer
    return model["layers"] * layer


def _logits_bytes(*, model, tokens):
    # finetune.py's loss (utils/train/loss.py) holds the logits of one chunk of tokens at a time (fp32,
    # the head's 16-bit output and the 16-bit gradient: 8 bytes an element), and the gradient of
    # the hidden states plus the float32 copy of them that mixed precision returns. transformers'
    # own loss would hold 2 * tokens * vocab * 4 (fp32 logits and their gradient) and more.
    vocab, hidden = model["vocab"], model["hidden"]
    chunk_tokens = min(tokens, max(16, 2**25 // vocab))
    return chunk_tokens * vocab * 8 + tokens * hidden * (2 + 4)


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
                    lora_targets=LORA_TARGETS, lora_dropout=0.05) -> dict:
    """GiB of each part, and the total, for LoRA on one GPU: on a quantized base (bits 8 or 4) or
    on a bf16 base (bits 16). No CUDA context: what torch.cuda.max_memory_allocated would say."""
    hidden, vocab = model["hidden"], model["vocab"]
    linear, lora_parameters = _shapes(model, lora_r, lora_targets)
    if bits == 16:
        # finetune.py calls prepare_model_for_kbit_training only for a quantized base: here the
        # embeddings, the head and the residual stream stay bf16.
        weights = linear * 2 + 2 * vocab * hidden * 2
        residual_bytes = 2
    else:
        weights = linear * (1 if bits == 8 else 0.53) + 2 * vocab * hidden * 4  # embeddings + head in fp32
        residual_bytes = 4  # each layer's fp32 input (PEFT upcasts the residual stream)
    activations = _activation_bytes(model=model, checkpointing=checkpointing, residual_bytes=residual_bytes,
                                    batch=batch, seq_len=seq_len, lora_r=lora_r, lora_targets=lora_targets,
                                    lora_dropout=lora_dropout)
    logits = _logits_bytes(model=model, tokens=batch * seq_len)
    parts = {"weights": weights, "LoRA + AdamW": 16 * lora_parameters, "activations": activations, "logits": logits}
    parts = {name: value / GIB for name, value in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def sharded_training_memory(*, model=LLAMA_2_7B, bits, gpus, checkpointing, batch=16, seq_len=512, lora_r=16,
                            lora_targets=LORA_TARGETS, lora_dropout=0.05) -> dict:
    """GiB on each GPU, by part, and the total: LoRA on a bf16 base (bits=16) or QLoRA (bits=4) on
    `gpus` GPUs with FSDP's full sharding; each GPU trains its own micro-batch of batch x seq_len.

    One GPU is training_memory plus CUDA_OVERHEAD_GIB: no FSDP, finetune.py's own layout. On
    several GPUs, FSDP (full sharding, decoder layers wrapped one FSDP unit each, LoRA modules
    each their own unit as PEFT's fsdp_auto_wrap_policy does):
    - weights: each GPU keeps 1/gpus of the frozen decoder-layer weights (bf16: 2 bytes a
      parameter; NF4: 0.5, packed into bf16 storage). NF4's quantization constants (about 0.03
      bytes a parameter) stay whole on every GPU: bitsandbytes keeps them on the module, outside
      FSDP's flat parameters. The embeddings, final norm and head are in the root unit, which FSDP
      gathers for the forward pass and keeps whole until the backward pass (whose start, with
      every activation saved, is the peak): their whole size plus this GPU's shard. They are bf16
      for QLoRA too: FSDP wants the 4-bit storage dtype equal to the compute dtype, so nothing is
      upcast to fp32 as prepare_model_for_kbit_training does on one GPU.
    - gathered: FSDP all-gathers one decoder layer's whole weights at a time; count two such
      layers, the one computing and the next one prefetched (forward and backward prefetch),
      with their LoRA weights and gradients in fp32 before the gradients are reduce-scattered.
    - LoRA + AdamW: fp32 LoRA weights, gradients and both AdamW moments, 1/gpus of them.
    - activations and logits: those of this GPU's own micro-batch, unchanged by gpus; the
      residual stream is bf16 (2 bytes a checkpointed layer input) for both bases.
    - overhead: CUDA_OVERHEAD_GIB plus NCCL_OVERHEAD_GIB.
    """
    if bits not in (16, 4):
        raise ValueError("bits: 16 (LoRA on a bf16 base) or 4 (QLoRA); an 8-bit base does not shard under FSDP")
    if gpus == 1:
        parts = training_memory(model=model, bits=bits, checkpointing=checkpointing, batch=batch, seq_len=seq_len,
                                lora_r=lora_r, lora_targets=lora_targets, lora_dropout=lora_dropout)
        total = parts.pop("total")
        return {**parts, "gathered": 0.0, "overhead": CUDA_OVERHEAD_GIB, "total": total + CUDA_OVERHEAD_GIB}
    hidden, vocab, layers = model["hidden"], model["vocab"], model["layers"]
    linear, lora_parameters = _shapes(model, lora_r, lora_targets)
    stored = 2 if bits == 16 else 0.5  # bytes a frozen linear parameter, as FSDP shards it
    replicated = 0 if bits == 16 else 0.03 * linear  # NF4's quantization constants, on every GPU
    root = 2 * vocab * hidden * 2  # embeddings + head, bf16
    weights = linear * stored / gpus + replicated + root + root / gpus
    gathered = 2 * (linear / layers * stored + lora_parameters / layers * 8)
    activations = _activation_bytes(model=model, checkpointing=checkpointing, residual_bytes=2, batch=batch,
                                    seq_len=seq_len, lora_r=lora_r, lora_targets=lora_targets,
                                    lora_dropout=lora_dropout)
    logits = _logits_bytes(model=model, tokens=batch * seq_len)
    parts = {"weights": weights, "LoRA + AdamW": 16 * lora_parameters / gpus, "activations": activations,
             "logits": logits, "gathered": gathered}
    parts = {name: value / GIB for name, value in parts.items()}
    parts["overhead"] = CUDA_OVERHEAD_GIB + NCCL_OVERHEAD_GIB
    parts["total"] = sum(parts.values())
    return parts


def smallest_card(gib):
    """The smallest common card size whose memory holds gib on each GPU, or "> 80 GB"."""
    return next((name for name, capacity in CARDS if gib <= capacity), "> 80 GB")


GPU_COUNTS = (1, 2, 4, 8)
METHODS = {"LoRA bf16": 16, "QLoRA": 4}


def sharding_table():
    """Markdown lines of docs/hardware.md's table: per-GPU GiB and the card it needs."""
    lines = ["| model | method | checkpointing | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPU_COUNTS)
             + " |", "| --- | --- | --- | " + " | ".join("---:" for _ in GPU_COUNTS) + " |"]
    for name, model in MODELS.items():
        for method, bits in METHODS.items():
            for checkpointing in (True, False):
                cells = []
                for gpus in GPU_COUNTS:
                    total = sharded_training_memory(model=model, bits=bits, gpus=gpus, checkpointing=checkpointing)["total"]
                    cells.append(f"{total:.1f} ({smallest_card(total)})")
                lines.append(f"| {name} | {method} | {'on' if checkpointing else 'off'} | " + " | ".join(cells) + " |")
    return lines


def readme_table():
    """Markdown lines of the README's table: the card each needs, checkpointing on."""
    lines = ["| checkpointing on | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in GPU_COUNTS) + " |",
             "| --- | " + " | ".join("---" for _ in GPU_COUNTS) + " |"]
    for name, model in MODELS.items():
        for method, bits in METHODS.items():
            cells = [smallest_card(sharded_training_memory(model=model, bits=bits, gpus=gpus, checkpointing=True)["total"])
                     for gpus in GPU_COUNTS]
            lines.append(f"| {name}, {method} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sharding", action="store_true",
                        help="also print the per-GPU peaks on 1/2/4/8 GPUs with FSDP (docs/hardware.md, README)")
    arguments = parser.parse_args(argv)
    print("| Llama-2-7B, LoRA r=16 q/k/v/o, 16 x 512 tokens | weights | LoRA + AdamW | activations | logits | total (GiB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for bits in (8, 4):
        for checkpointing in (False, True):
            parts = training_memory(bits=bits, checkpointing=checkpointing)
            print(f"| {bits}-bit base, checkpointing {'on' if checkpointing else 'off'} | "
                  + " | ".join(f"{parts[name]:.1f}" for name in ("weights", "LoRA + AdamW", "activations", "logits", "total"))
                  + " |")
    if arguments.sharding:
        print("\nPer-GPU peak (GiB) and the smallest card that holds it; FSDP full sharding, LoRA r=16 q/k/v/o,"
              " micro-batch 16 x 512 tokens on each GPU:\n")
        print("\n".join(sharding_table()))
        print("\nREADME (checkpointing on):\n")
        print("\n".join(readme_table()))


if __name__ == "__main__":
    main()
