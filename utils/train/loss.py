"""The training loss without the full logits: the output head and cross-entropy, a chunk of tokens
at a time.

transformers' causal-LM loss computes the logits of every token (tokens x vocabulary), upcasts
them to float32 and keeps them, their log-softmax and then their gradient for the backward pass:
for SmolLM2 (49K vocabulary) at 4 x 200 tokens about 0.5 GB, for Qwen2.5-Coder (152K) at a 16 x 512
micro-batch about 14 GB, more than the rest of the step. Here the logits exist one chunk at a time,
and the gradient of the loss with respect to the hidden states (tokens x hidden size, small) is
computed in the forward pass, while the chunk's softmax is at hand, so nothing is recomputed (the
idea of Liger-Kernel's fused linear cross-entropy, which needs Triton; this is plain PyTorch and
runs on a CPU too). Tokens whose label is -100 (prompts under --train_on_inputs False, example
boundaries of packed rows) get no logits at all. The loss is the same sum as transformers' (the
head in the model's dtype, cross-entropy in float32), normalized the same way.
"""

import contextlib

import torch

from utils.tokenization import IGNORE_INDEX

# Logits of at most this many elements exist at once: on a CPU 32 MB in float32 (170 tokens of a 49K
# vocabulary: chunks this large make the head's matmuls faster than smaller ones, bench/RESULTS.md),
# on a GPU 128 MB (220 tokens of a 152K one: few kernel
# launches and large enough matmuls).
CHUNK_ELEMENTS = {"cpu": 2**23, "cuda": 2**25}
# Architectures whose logits are exactly lm_head(final hidden states): no soft-capping (Gemma 2/3),
# logit scale (Cohere) or divisor (Granite), no bias. Others keep transformers' own loss.
PLAIN_HEAD_MODEL_TYPES = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "starcoder2",
                          "phi3", "olmo2"}


def head_chunking(hidden, weight) -> tuple[int, torch.dtype]:
    """(tokens a chunk, the head's matmul dtype) for the chunked head: chunks of CHUNK_ELEMENTS logits,
    and the dtype the model's own head runs in, autocast's under mixed precision (the hidden states
    are float32 there when LoRA's float32 output joined the residual stream)."""
    device = hidden.device.type
    chunk_tokens = max(16, CHUNK_ELEMENTS.get(device, CHUNK_ELEMENTS["cuda"]) // weight.shape[0])
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
    return chunk_tokens, dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), and its gradient, by chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, packed):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            # the head in the model's dtype, the loss in float32, as transformers does
            logits = (h @ weight.T if packed is None else packed.times_transposed(h)).float()
            rows = torch.arange(t.numel(), device=t.device)
            target_logits = logits[rows, t]
            # log-sum-exp and the softmax from one exponential, in place (each pass over a chunk's
            # logits reads and writes 32 MB on a CPU).
            maxima = logits.amax(dim=-1, keepdim=True)
            exponentials = logits.sub_(maxima).exp_()
            sums = exponentials.sum(dim=-1, keepdim=True)
            total += (sums.log()[:, 0] + maxima[:, 0] - target_logits).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d(loss)/d(logits) = softmax - one-hot, each element rounded once to the head's dtype.
            inverse_sums = sums.reciprocal_()
            grad_logits = torch.mul(exponentials, inverse_sums, out=torch.empty_like(exponentials, dtype=h.dtype))
            grad_logits[rows, t] = (exponentials[rows, t] * inverse_sums[:, 0] - 1).to(h.dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_tokens] = grad_logits @ weight if packed is None else packed.times(grad_logits)
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
                None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
                None, None, None)


def linear_cross_entropy(hidden, weight, labels, *, num_items_in_batch=None, packed=None):
    """transformers' causal-LM loss (ForCausalLMLoss) from the final hidden states (batch, length,
    hidden) and the head's weight: labels shifted by one, -100 ignored, the sum divided by
    num_items_in_batch (the tokens of the whole accumulated batch) or, without it, the mean.
    packed: the head's PackedWeight (utils/train/speedups/packed_weights.py) when it has one, for a frozen bf16 head."""
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = targets != IGNORE_INDEX
    device = hidden.device.type
    chunk_tokens, dtype = head_chunking(hidden, weight)
    if dtype != torch.bfloat16 or weight.requires_grad:
        packed = None  # the packs are bf16, of a frozen weight
    with torch.autocast(device, enabled=False):
        total = LinearCrossEntropy.apply(hidden[keep].to(dtype), weight.to(dtype), targets[keep], chunk_tokens, packed)
    if num_items_in_batch is None:
        return total / keep.sum().clamp(min=1)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class LinearLogProbs(torch.autograd.Function):
    """Per-token log p(target) under softmax(hidden @ weight.T / temperature), and the entropy of that
    distribution (for logging: no gradient), by chunks: GRPO's policy term without the full logits.
    d log p / d logits = (one-hot - softmax) / temperature does not depend on the loss, so the
    gradient with respect to each token's hidden state is computed here, while the chunk's softmax
    is at hand, and the backward only scales it by that token's incoming gradient: the head's
    matmul runs twice (forward, input gradient), never a third time to recompute the logits."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_tokens, packed):
        count = hidden.shape[0]
        log_probs = torch.empty(count, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(count, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, count, chunk_tokens):
            h, t = hidden[start:start + chunk_tokens], targets[start:start + chunk_tokens]
            logits = (h @ weight.T if packed is None else packed.times_transposed(h)).float()
            if temperature != 1.0:
                logits.div_(temperature)
            rows = torch.arange(t.numel(), device=t.device)
            shifted = logits.sub_(logits.amax(dim=-1, keepdim=True))  # z - max, in place
            exponentials = shifted.exp()
            sums = exponentials.sum(dim=-1)
            log_sums = sums.log()
            log_probs[start:start + chunk_tokens] = shifted[rows, t] - log_sums
            # entropy = log sum e^z - sum p z, both with the max taken out
            entropy[start:start + chunk_tokens] = log_sums - (exponentials * shifted).sum(dim=-1) / sums
            if grad_hidden is None:
                continue
            grad_logits = exponentials.div_(sums.unsqueeze(-1)).neg_()  # -softmax, in place
            grad_logits[rows, t] += 1.0
            if temperature != 1.0:
                grad_logits.div_(temperature)
            grad_logits = grad_logits.to(h.dtype)  # each element rounded once to the head's dtype
            grad_hidden[start:start + chunk_tokens] = grad_logits @ weight if packed is None else packed.times(grad_logits)
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        (grad_hidden,) = ctx.saved_tensors
        if grad_hidden is None or grad_log_probs is None:
            return None, None, None, None, None, None
        return grad_hidden * grad_log_probs.unsqueeze(-1).to(grad_hidden.dtype), None, None, None, None, None


def linear_log_probs(hidden, weight, targets, *, temperature: float = 1.0, packed=None):
    """(log p(target), entropy) per token, each shaped like targets, from hidden states (..., hidden)
    and a frozen head's weight, as TRL's GRPOTrainer computes them from the logits divided by the
    sampling temperature. packed: the head's PackedWeight (utils/train/speedups/packed_weights.py)."""
    if weight.requires_grad:
        raise ValueError("linear_log_probs takes a frozen head (its weight gets no gradient here)")
    device = hidden.device.type
    chunk_tokens, dtype = head_chunking(hidden, weight)
    if dtype != torch.bfloat16:
        packed = None  # the packs are bf16
    shape = targets.shape
    with torch.autocast(device, enabled=False):
        log_probs, entropy = LinearLogProbs.apply(hidden.reshape(-1, hidden.shape[-1]).to(dtype), weight.to(dtype),
                                                  targets.reshape(-1), float(temperature), chunk_tokens, packed)
    return log_probs.view(shape), entropy.view(shape)


def head_of(model):
    """The output head of a (PEFT-wrapped) causal LM when the chunked loss computes exactly its
    loss, else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    plain = (getattr(base.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
             and isinstance(head, torch.nn.Linear) and head.bias is None)
    return head if plain else None


@contextlib.contextmanager
def head_skipped(head):
    """The model's forward returns its final hidden states in place of the logits (the head
    passes its input through), so that the loss can apply the head itself, chunk by chunk. The
    forward still runs through every wrapper (DDP, accelerate), only the head is bypassed."""
    previous = head.__dict__.get("forward")  # an instance's own forward (utils/train/speedups/packed_weights.py)
    head.forward = lambda hidden_states: hidden_states
    try:
        yield
    finally:
        if previous is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = previous
