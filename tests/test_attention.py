"""utils/train/attention.py: the matmul attention that CPUs use for short examples equals SDPA's; the GPU
paths for packed rows of mixed lengths (varlen, and SDPA without cuDNN)."""

import contextlib

import pytest
import torch
from torch.nn.attention import SDPBackend
from transformers.integrations.sdpa_attention import repeat_kv

from utils.train import attention


def attention_and_grads(attend, dtype, shape, kv_heads):
    torch.manual_seed(0)
    batch, heads, length, dim = shape
    query = torch.randn(*shape, dtype=dtype, requires_grad=True)
    key, value = (torch.randn(batch, kv_heads, length, dim, dtype=dtype, requires_grad=True) for _ in range(2))
    grad_output = torch.randn(*shape, dtype=dtype)
    output = attend(query, key, value)
    output.backward(grad_output)
    return [output.detach(), query.grad, key.grad, value.grad]


def reference_attention(query, key, value, scale):
    """SDPA in float32 over key/value heads repeated for each query head (transformers' repeat_kv)."""
    key, value = (repeat_kv(t.float(), query.shape[1] // key.shape[1]) for t in (key, value))
    return torch.nn.functional.scaled_dot_product_attention(query.float(), key, value, is_causal=True, scale=scale)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape, kv_heads", [
    ((1, 9, 37, 64), 9),   # one example
    ((3, 4, 128, 32), 4),  # a batch of equal-length ones
    ((2, 9, 50, 64), 3),   # grouped-query attention (SmolLM2: 9 query heads, 3 key/value heads)
])
def test_matmul_attention_equals_sdpa_forward_and_backward(dtype, tolerance, shape, kv_heads):
    scale = 0.3
    ours = attention_and_grads(lambda q, k, v: attention.MatmulCausalAttention.apply(q, k, v, scale), dtype, shape, kv_heads)
    reference = attention_and_grads(lambda q, k, v: reference_attention(q, k, v, scale), torch.float32, shape, kv_heads)
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == dtype
        assert torch.allclose(mine.float(), theirs, atol=tolerance * theirs.abs().max().item(), rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scale_and_mask_inside_the_matmul_give_the_bits_of_scaling_and_masking_the_float32_scores(dtype):
    """At head_dim 64 (scale 1/8, a power of two) the forward is the plain formula's to the last bit."""
    torch.manual_seed(0)
    query, key, value = torch.randn(1, 9, 70, 64, dtype=dtype), *torch.randn(2, 1, 3, 70, 64, dtype=dtype)
    grouped = query.reshape(1, 3, 3 * 70, 64)
    scores = torch.matmul(grouped, key.transpose(-1, -2)).float().mul_(0.125)
    future = torch.ones(70, 70, dtype=torch.bool).triu_(1).repeat(3, 1)
    probabilities = torch.softmax(scores.masked_fill_(future, float("-inf")), dim=-1).to(dtype)
    expected = torch.matmul(probabilities, value).reshape(1, 9, 70, 64)
    assert torch.equal(attention.MatmulCausalAttention.apply(query, key, value, 0.125), expected)


def test_cpu_examples_up_to_the_limit_use_matmul_attention_longer_ones_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention.MatmulCausalAttention, "apply",
                        lambda *args: calls.append("matmul") or torch.zeros_like(args[0]))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append("sdpa") or sdpa(*args, **kwargs))
    limit = attention.MATMUL_ATTENTION_MAX_TOKENS
    for length in (limit, limit + 1):
        q = torch.randn(1, 2, length, 8)
        attention.causal_attention(q, q, q, dropout=0.0, scale=None)
    attention.causal_attention(q[..., :4, :], q[..., :4, :], q[..., :4, :], dropout=0.1, scale=None)  # dropout: SDPA's
    assert calls == ["matmul", "sdpa", "sdpa"]


@pytest.mark.parametrize("matmul_limit", [10**6, 0])  # the matmul attention; SDPA with enable_gqa
def test_grouped_query_attention_keeps_no_repeated_keys_for_the_backward(monkeypatch, matmul_limit):
    """A packed row of two examples, 9 query heads over 3 key/value heads: the tensors kept for
    the backward pass hold key and value at their own 3 heads. Repeated to 9 (repeat_kv), SDPA
    would keep the copies: 3.3 GB at 16 x 512 tokens over Qwen2.5-Coder-7B's 28 layers."""
    monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_TOKENS", matmul_limit)
    torch.manual_seed(0)
    query = torch.randn(1, 9, 40, 16, requires_grad=True)
    key, value = (torch.randn(1, 3, 40, 16, requires_grad=True) for _ in range(2))
    position_ids = torch.cat([torch.arange(25), torch.arange(15)])[None]
    module = torch.nn.Module().train()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        output, _ = attention.per_example_sdpa(module, query, key, value, None, position_ids=position_ids)
    assert output.shape == (1, 40, 9, 16)
    for start, end in ((0, 25), (25, 40)):  # each example alone, against SDPA over repeated heads
        alone = reference_attention(*(t[:, :, start:end] for t in (query, key, value)), None)
        assert torch.allclose(output[:, start:end], alone.transpose(1, 2), atol=1e-5)
    heads_of_saved = [shape[-3] for shape in saved if len(shape) == 4 and shape[-1] == 16]
    assert heads_of_saved.count(3) >= 2 * 2  # key and value of each example, at their own 3 heads
    assert heads_of_saved.count(9) <= 2 * 2  # at most each example's query and output


def test_matmul_attention_under_autocast_takes_float32_inputs():
    """A quantized base's LoRA layers return float32 under autocast: the attention computes in
    autocast's dtype, as SDPA would, and its backward, which runs outside autocast (as the
    Trainer's does), gets one dtype."""
    shape, kv_heads = (1, 9, 30, 16), 3

    def forward_under_autocast(query, key, value):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return attention.causal_attention(query, key, value, dropout=0.0, scale=None)

    ours = attention_and_grads(forward_under_autocast, torch.float32, shape, kv_heads)
    reference = attention_and_grads(lambda q, k, v: reference_attention(q, k, v, None), torch.float32, shape, kv_heads)
    assert ours[0].dtype == torch.bfloat16
    for mine, theirs in zip(ours, reference):
        assert torch.allclose(mine.float(), theirs, atol=2e-2 * theirs.abs().max().item(), rtol=0)


def reference_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                          enable_gqa=False):
    """torch's varlen_attn as documented ((tokens, heads, head_dim), cumulative bounds), in float32
    on a CPU: the CUDA kernel's stand-in."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and window_size == (-1, 0)
    assert enable_gqa == (key.shape[1] != query.shape[1])
    bounds = cu_seq_q.tolist()
    assert max_q == max_k == max(end - start for start, end in zip(bounds, bounds[1:]))
    pieces = [reference_attention(*(t[start:end].transpose(0, 1)[None] for t in (query, key, value)), scale)[0]
              for start, end in zip(bounds, bounds[1:])]
    return torch.cat(pieces, dim=1).transpose(0, 1).to(query.dtype)


@pytest.mark.parametrize("kv_heads", [9, 3])
def test_a_row_of_mixed_lengths_goes_to_varlen_in_one_call_with_the_same_result(monkeypatch, kv_heads):
    """On a GPU a packed row of examples of different lengths goes to torch's varlen flash attention
    in one call (the CUDA kernel is replaced here by a float32 reference of its documented contract):
    the layout, the bounds and the causal window give what the per-example calls give."""
    import torch.nn.attention.varlen

    calls = []
    monkeypatch.setattr(torch.nn.attention.varlen, "varlen_attn",
                        lambda *args, **kwargs: calls.append(args[3].tolist()) or reference_varlen_attn(*args, **kwargs))
    torch.manual_seed(0)
    query = torch.randn(1, 40, 9, 16).transpose(1, 2).requires_grad_()  # transformers' layout: a transposed view
    key, value = (torch.randn(1, 40, kv_heads, 16).transpose(1, 2).requires_grad_() for _ in range(2))
    position_ids = torch.cat([torch.arange(25), torch.arange(5), torch.arange(10)])[None]
    module = torch.nn.Module().train()

    def attend(varlen):
        monkeypatch.setattr(attention, "use_varlen_attention", lambda *args, **kwargs: varlen)
        monkeypatch.setattr(attention, "MATMUL_ATTENTION_MAX_TOKENS", 0)
        output, _ = attention.per_example_sdpa(module, query, key, value, None, position_ids=position_ids, scaling=0.2)
        grads = torch.autograd.grad(output, [query, key, value], torch.ones_like(output))
        return [output, *grads]

    for mine, theirs in zip(attend(True), attend(False)):
        assert torch.allclose(mine, theirs, atol=1e-5)
    assert calls == [[0, 25, 30, 40]]


def test_varlen_is_used_only_where_it_runs(monkeypatch):
    query, key = torch.randn(1, 8, 10, 64, dtype=torch.bfloat16), torch.randn(1, 2, 10, 64, dtype=torch.bfloat16)
    assert not attention.use_varlen_attention(query, key, dropout=0.0)  # a CPU
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(attention, "cuda_native_bf16", lambda index: True)  # Ampere or newer
    monkeypatch.setattr(attention, "varlen_keywords", lambda: frozenset({"scale", "window_size", "enable_gqa"}))
    assert attention.use_varlen_attention(query, key, dropout=0.0)
    assert not attention.use_varlen_attention(query, key, dropout=0.1)  # attention dropout: SDPA's
    assert not attention.use_varlen_attention(query.float(), key.float(), dropout=0.0)  # float32, no autocast
    monkeypatch.setattr(attention, "cuda_native_bf16", lambda index: False)  # T4, V100: no flash kernel
    assert not attention.use_varlen_attention(query, key, dropout=0.0)
    monkeypatch.setattr(attention, "cuda_native_bf16", lambda index: True)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: False)  # a torch built without it
    assert not attention.use_varlen_attention(query, key, dropout=0.0)
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    monkeypatch.setattr(attention, "varlen_keywords", lambda: frozenset({"scale", "window_size"}))  # torch 2.11
    assert not attention.use_varlen_attention(query, key, dropout=0.0)  # grouped-query needs enable_gqa
    assert attention.use_varlen_attention(query, key[:, [0, 0, 0, 0, 1, 1, 1, 1]], dropout=0.0)
    monkeypatch.setattr(attention, "varlen_keywords", lambda: frozenset({"is_causal"}))  # torch 2.9-2.10
    assert not attention.use_varlen_attention(query, query, dropout=0.0)


def test_mixed_lengths_on_a_gpu_keep_off_cudnn_which_plans_each_new_shape(monkeypatch):
    """cuDNN's SDPA builds an execution plan for each new shape: on an H100, 32 examples of new
    lengths took 7.6 s against 17 ms with the flash kernel. Examples of mixed lengths run without it."""
    chosen = []
    monkeypatch.setattr(attention, "sdpa_kernel", lambda backends: chosen.append(backends) or contextlib.nullcontext())
    attention.shape_free_kernels(torch.device("cuda"))
    assert chosen and SDPBackend.FLASH_ATTENTION in chosen[0] and SDPBackend.CUDNN_ATTENTION not in chosen[0]
    chosen.clear()
    attention.shape_free_kernels(torch.device("cpu"))  # a CPU: SDPA's own choice
    assert not chosen

    entered = []
    monkeypatch.setattr(attention, "shape_free_kernels", lambda device: entered.append(device) or contextlib.nullcontext())
    query = torch.randn(1, 4, 30, 8)
    mixed = torch.cat([torch.arange(20), torch.arange(10)])[None]
    attention.per_example_sdpa(torch.nn.Module().train(), query, query, query, None, position_ids=mixed)
    assert len(entered) == 1
    equal = torch.cat([torch.arange(15), torch.arange(15)])[None]  # one batched call, one shape
    attention.per_example_sdpa(torch.nn.Module().train(), query, query, query, None, position_ids=equal)
    assert len(entered) == 1
