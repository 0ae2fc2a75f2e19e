"""Attention over each example of a packed row, and nothing across examples.

A packed row (finetune.py's padding-free batches) concatenates the examples of a micro-batch, with
position ids restarting at 0 at each example. transformers' `sdpa` runs attention over the whole
row with a dense block-diagonal mask: the masked cross-example blocks are computed anyway (4
examples of equal length: 4x the attention work of the examples alone), and on a GPU the mask of
a 16 x 512-token row is an 8192 x 8192 tensor. `sdpa_per_example` (registered here under that
name for `attn_implementation`) splits the row at the restarts and runs causal attention on each
example alone: the same result, no cross-example compute, no mask. The attention itself is SDPA,
except for short examples on a CPU (MatmulCausalAttention, faster there). Batches that carry a padding
mask, and generation with a KV cache, go to transformers' own `sdpa` unchanged.

It attends causally over each whole example: no sliding window, no soft-capping of the scores, no
attention sinks. `per_example_limits` tells, from a model's config, where that would compute
something else (Gemma 2's soft-capping, Mistral v0.1's window on examples longer than it, gpt-oss's
sinks), and finetune.py then hands the model to transformers' own attention; a packed row that
meets one of them here anyway (the kernel forced) stops with an error instead of training wrong.
"""

import contextlib
import functools
import inspect
import itertools

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

from utils.precision import cuda_native_bf16

PER_EXAMPLE_SDPA = "sdpa_per_example"
# On a CPU, examples of up to this many tokens attend through MatmulCausalAttention: about twice as
# fast as the CPU flash kernel (forward + backward) at 64-128 tokens. It keeps each example's
# probabilities (tokens² x heads, in the model's dtype) for the backward pass, so longer examples
# stay on the flash kernel, which keeps none.
MATMUL_ATTENTION_MAX_TOKENS = 256


class MatmulCausalAttention(torch.autograd.Function):
    """Causal attention by plain matmuls, softmax in float32, with a hand-written backward that
    keeps only the probabilities (in the inputs' dtype): what autograd would keep for the same
    formula is the float32 softmax too, 3x the memory. Gradients: dV = Pᵀ dO,
    dS = P ∘ (dP - rowsum(dP ∘ P)) with dP = dO Vᵀ (softmax's own backward kernel, float32 inside,
    one pass), dQ = dS K scale, dK = dSᵀ Q scale.

    Grouped-query attention without repeating K and V: the query heads that share a key/value head
    are stacked along the length, (kv_heads, groups x length, head_dim), so each key/value head
    meets all its query heads in one matmul (as repeat_kv orders them: head h uses h // groups)."""

    @staticmethod
    def forward(ctx, query, key, value, scale):
        *batch, heads, length, dim = query.shape
        kv_heads = key.shape[-3]
        groups = heads // kv_heads
        query = query.reshape(*batch, kv_heads, groups * length, dim)
        # Scaled and masked inside the matmul (the future's bias is -inf), in the inputs' dtype; the
        # softmax reads that and works in float32. For a power-of-two scale (head_dim 64: 1/8) the
        # same bits as scaling and masking the float32 scores, in less time (bench/RESULTS.md).
        queries, keys = query.reshape(-1, groups * length, dim), key.reshape(-1, length, dim)
        bias = future_bias(length=length, groups=groups, device=query.device, dtype=query.dtype).expand(queries.shape[0], -1, -1)
        scores = torch.baddbmm(bias, queries, keys.transpose(-1, -2), alpha=scale)
        probabilities = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype).view(*batch, kv_heads, -1, length)
        output = torch.matmul(probabilities, value)
        ctx.save_for_backward(query, key, value, probabilities)
        ctx.scale = scale
        return output.reshape(*batch, heads, length, dim)

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, probabilities = ctx.saved_tensors
        *batch, heads, length, dim = grad_output.shape
        grad_output = grad_output.reshape(query.shape)
        grad_value = torch.matmul(probabilities.transpose(-1, -2), grad_output)  # sums over the group
        grad_probabilities = torch.matmul(grad_output, value.transpose(-1, -2))
        # One pass where the float32 formula took five (cast, subtract, multiply, scale, cast back;
        # its share of a SmolLM2 micro-step: bench/RESULTS.md). The row sum is rowsum(dP ∘ P), not rowsum(dO ∘ O):
        # equal in exact arithmetic, rounded differently; the gradients are as close to a float64
        # reference as before (bench/RESULTS.md).
        grad_scores = torch.ops.aten._softmax_backward_data(grad_probabilities, probabilities, -1,
                                                            probabilities.dtype).mul_(ctx.scale)
        grad_query = torch.matmul(grad_scores, key).reshape(*batch, heads, length, dim)
        grad_key = torch.matmul(grad_scores.transpose(-1, -2), query)
        return grad_query, grad_key, grad_value, None


@functools.lru_cache(maxsize=64)
def future_bias(length: int, groups: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-inf above the diagonal (the future), 0 elsewhere, once for each query head of a group:
    (groups x length, length). Cached (CPU examples of up to 256 tokens: at most 64 x 128 KB x
    groups in bf16, twice that in float32): every layer of a forward pass asks for the same
    lengths, one per example of the micro-batch. Read-only."""
    future = torch.ones(length, length, dtype=torch.bool, device=device).triu_(1).repeat(groups, 1)
    return torch.zeros(future.shape, dtype=dtype, device=device).masked_fill_(future, float("-inf"))


def in_autocast_dtype(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors in autocast's dtype where autocast is on for their device, else as they are."""
    device = tensors[0].device.type
    if not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) for t in tensors)


def causal_attention(query, key, value, *, dropout: float, scale: float | None):
    """Causal attention of one example (or a batch of equal-length ones), no mask. key and value
    may have fewer heads than query (grouped-query attention); they are never repeated in memory:
    repeated, SDPA would keep the copies for the backward pass (3.3 GB at 16 x 512 tokens over
    Qwen2.5-Coder-7B's 28 layers without checkpointing)."""
    device = query.device.type
    if device == "cpu" and dropout == 0.0 and query.shape[-2] <= MATMUL_ATTENTION_MAX_TOKENS:
        # In autocast's dtype, as SDPA runs under autocast; the backward runs outside autocast,
        # so the forward must see one dtype (a quantized base's LoRA layers return float32).
        query, key, value = in_autocast_dtype(query, key, value)
        with torch.autocast(device, enabled=False):
            return MatmulCausalAttention.apply(query, key, value, query.shape[-1] ** -0.5 if scale is None else scale)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=dropout, is_causal=True,
                                                            scale=scale, enable_gqa=key.shape[-3] != query.shape[-3])


@functools.cache
def varlen_keywords() -> frozenset:
    """The keywords of this torch's varlen_attn (flash attention over a packed row; CUDA only), or
    none where it has none. Its signature moved between releases: `is_causal` (2.9-2.10), then
    `scale` and `window_size`, then `enable_gqa`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return frozenset()
    return frozenset(inspect.signature(varlen_attn).parameters)


def use_varlen_attention(query: torch.Tensor, key: torch.Tensor, *, dropout: float) -> bool:
    """Whether a packed row of examples of different lengths goes to varlen_attn in one call (on a
    GPU, in half precision, without attention dropout) rather than one SDPA call per example.
    varlen_attn calls the flash kernel directly, without SDPA's checks: it needs a torch built with
    it and an Ampere or newer GPU (compute capability 8.0, as native bf16: T4 and V100 have neither)."""
    keywords = varlen_keywords()
    return (query.device.type == "cuda" and dropout == 0.0 and query.shape[-1] <= 256
            and (query.dtype in (torch.float16, torch.bfloat16) or torch.is_autocast_enabled("cuda"))
            and {"scale", "window_size"} <= keywords
            and (key.shape[-3] == query.shape[-3] or "enable_gqa" in keywords)
            and torch.backends.cuda.is_flash_attention_available() and cuda_native_bf16(query.device.index))


def varlen_causal_attention(query, key, value, *, sizes: list[int], scale: float | None):
    """Causal attention of each example of one packed row in a single varlen_attn call.
    query: (heads, length, head_dim), key/value: (kv_heads, length, head_dim); returns query's shape."""
    from torch.nn.attention.varlen import varlen_attn

    query, key, value = in_autocast_dtype(query, key, value)  # a custom op: autocast does not cast its inputs
    bounds = torch.tensor(list(itertools.accumulate(sizes, initial=0)), device=query.device, dtype=torch.int32)
    longest = max(sizes)
    # window_size (-1, 0): everything before, nothing after (causal); (tokens, heads, head_dim) layout.
    grouped = {"enable_gqa": True} if key.shape[0] != query.shape[0] else {}
    output = varlen_attn(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), bounds, bounds,
                         longest, longest, scale=scale, window_size=(-1, 0), **grouped)
    return output.transpose(0, 1)


def shape_free_kernels(device: torch.device):
    """On a GPU, SDPA without its cuDNN backend, which builds an execution plan for each new shape
    (about 0.2 s each on an H100, bench/RESULTS.md): the examples of a packed row bring new lengths
    step after step, up to one per token count. Flash and memory-efficient kernels take any length
    as it comes. Padded batches are left to SDPA's choice: they come in at most cutoff_len / 8
    shapes (padded to multiples of 8), each planned once."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def example_spans(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each example in a packed row of position ids (a restart at 0 opens one)."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0, *starts]
    return list(zip(starts, [*starts[1:], position_ids.numel()]))


# Models whose attention adds learned sinks to the softmax (config.model_type).
SINK_MODEL_TYPES = ("gpt_oss",)


def per_example_limits(config, *, cutoff_len: int) -> tuple[str, str] | None:
    """(transformers' attention that computes it, why) where per-example attention would compute
    something other than config's model does on examples of up to cutoff_len tokens; else None."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "attn_logit_softcapping", None):
        return "eager", f"its attention soft-caps the scores (attn_logit_softcapping {config.attn_logit_softcapping})"
    if getattr(config, "model_type", None) in SINK_MODEL_TYPES:
        return "eager", "its attention has sinks"
    window = getattr(config, "sliding_window", None)
    if window and window <= cutoff_len:
        return "sdpa", f"its attention slides over a window of {window} tokens, within --cutoff_len {cutoff_len}"
    return None


def check_per_example_features(kwargs: dict, longest: int) -> None:
    """Refuse what per-example attention does not compute (see per_example_limits)."""
    window = kwargs.get("sliding_window")
    if kwargs.get("softcap") or kwargs.get("s_aux") is not None or (window and longest >= window):
        raise ValueError(f"{PER_EXAMPLE_SDPA} attends over whole examples, without this model's sliding window, "
                         "soft-capping or sinks: use --attn_implementation auto (or sdpa, eager)")


def per_example_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """query: (batch, heads, length, head_dim), key/value: (batch, kv_heads, length, head_dim).
    Returns (batch, length, heads, head_dim) and no weights, as transformers' attention functions do."""
    position_ids = kwargs.get("position_ids")
    packed = (
        attention_mask is None and position_ids is not None and query.shape[2] == key.shape[2] > 1
        and bool((position_ids[:, 1:] == 0).any())
    )
    if not packed:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    dropout = dropout if module.training else 0.0

    def attend(q, k, v):
        return causal_attention(q, k, v, dropout=dropout, scale=scaling)

    rows = []
    for positions, q, k, v in zip(position_ids.expand(query.shape[0], -1), *map(batch_rows, (query, key, value))):
        spans = example_spans(positions)
        check_per_example_features(kwargs, longest=max(end - start for start, end in spans))
        length = spans[0][1]
        if all(end - start == length for start, end in spans):
            # Examples of one length (a GPU benchmark, fixed-length data): one batched call.
            split = lambda t: t.unflatten(1, (len(spans), length)).transpose(0, 1)
            rows.append(attend(split(q), split(k), split(v)).transpose(0, 1).flatten(1, 2))
        elif use_varlen_attention(q, k, dropout=dropout):
            rows.append(varlen_causal_attention(q, k, v, sizes=[end - start for start, end in spans], scale=scaling))
        else:
            # split, not slicing: the backward of a slice zero-fills a gradient the size of the
            # whole row for every example; split's backward is one concatenation.
            sizes = [end - start for start, end in spans]
            pieces = zip(q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1))
            with shape_free_kernels(q.device):
                rows.append(torch.cat([attend(qe[None], ke[None], ve[None]).squeeze(0) for qe, ke, ve in pieces], dim=1))
    output = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack(rows)
    return output.transpose(1, 2).contiguous(), None


def batch_rows(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows of a batch, (heads, length, head_dim) each. A lone row (packed batches have one) is
    a view both ways; indexing, tensor[row], would zero-fill a gradient the size of the batch."""
    return (tensor.squeeze(0),) if tensor.shape[0] == 1 else tensor.unbind(0)


def per_example_mask(*args, attention_mask=None, **kwargs):
    """No mask when there is no padding (causality and example boundaries are applied in the
    attention itself, from the position ids); transformers' SDPA mask when there is."""
    if attention_mask is None or flash_attention_mask(*args, attention_mask=attention_mask, **kwargs) is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(PER_EXAMPLE_SDPA, per_example_sdpa)
AttentionMaskInterface.register(PER_EXAMPLE_SDPA, per_example_mask)
