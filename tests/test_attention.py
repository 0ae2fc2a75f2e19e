"""utils/attention.py: the matmul attention that CPUs use for short examples equals SDPA's."""

import pytest
import torch

from utils import attention


def attention_and_grads(attend, dtype, shape):
    torch.manual_seed(0)
    query, key, value = (torch.randn(*shape, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_output = torch.randn(*shape, dtype=dtype)
    output = attend(query, key, value)
    output.backward(grad_output)
    return [output.detach(), query.grad, key.grad, value.grad]


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("shape", [(1, 9, 37, 64), (3, 4, 128, 32)])  # one example; a batch of equal-length ones
def test_matmul_attention_equals_sdpa_forward_and_backward(dtype, tolerance, shape):
    scale = 0.3
    ours = attention_and_grads(lambda q, k, v: attention.MatmulCausalAttention.apply(q, k, v, scale), dtype, shape)
    reference = attention_and_grads(
        lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True,
                                                                         scale=scale), torch.float32, shape)
    for mine, theirs in zip(ours, reference):
        assert mine.dtype == dtype
        assert torch.allclose(mine.float(), theirs, atol=tolerance * theirs.abs().max().item(), rtol=0)


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
