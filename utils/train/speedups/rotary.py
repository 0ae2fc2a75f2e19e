"""Rotary position embeddings with a hand-written backward, for training on a CPU.

transformers' Llama-family attention rotates queries and keys as `q * cos + rotate_half(q) * sin`:
a negation, a concatenation, two products and a sum, and autograd's backward runs back through each
of them, zero-filling a full-size gradient for each half that rotate_half slices out and summing
them. `RotaryFunction` computes the same products, each rounded as it is there, adds the rotated
half in place of the concatenation, and has a three-pass backward: the same bits forward and
backward where q, k, cos and sin share a dtype, as they do in transformers' models (the tests
compare; mixed dtypes keep transformers' path), in less time (bench/RESULTS.md).

The attention layers look the function up in their modeling module at every call, so
`fast_rotary_embeddings(model)` swaps it there, for the length of a `with` block (finetune.py: the
training loop), in each modeling module of the model whose apply_rotary_pos_emb and rotate_half
read as Llama's (Mistral, Mixtral, Qwen2/3 and their MoEs, StarCoder2, Gemma, Granite...; not
Phi-3 or OLMo2, whose rotary differs). Off a CPU the original runs. Where the installed Llama
functions are not the code RotaryFunction was tested against (utils/train/speedups/source_code.py), nothing is
swapped (utils/train/speedups/'s line says so).
"""

import contextlib
import functools
import sys

import torch

from utils.train.speedups.source_code import llama_references, same_code, untested_code


class RotaryFunction(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1) for the halves x1, x2 of
    the last dimension; cos and sin are constants (no gradient)."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        half = x.shape[-1] // 2
        rotated = x * cos
        rotated[..., :half] += x[..., half:] * -sin[..., :half]  # -x2 * s1, the same bits as x2 * -s1
        rotated[..., half:] += x[..., :half] * sin[..., half:]
        ctx.save_for_backward(cos, sin)
        return rotated

    @staticmethod
    def backward(ctx, grad_output):
        cos, sin = ctx.saved_tensors
        half = grad_output.shape[-1] // 2
        grad_times_sin = grad_output * sin
        grad_x = grad_output * cos
        grad_x[..., :half] += grad_times_sin[..., half:]  # x1 reached the second half times s2
        grad_x[..., half:] -= grad_times_sin[..., :half]  # -x2 the first half times s1
        return grad_x, None, None


def fast_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, original):
    """transformers' apply_rotary_pos_emb (Llama's), through RotaryFunction on a CPU where q, k,
    cos and sin share a dtype (mixed, transformers' backward rounds each product's gradient to q's
    dtype before the sum, and RotaryFunction would not)."""
    if (q.device.type != "cpu" or cos.requires_grad or sin.requires_grad
            or len({q.dtype, k.dtype, cos.dtype, sin.dtype}) > 1):
        return original(q, k, cos, sin, unsqueeze_dim)
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return RotaryFunction.apply(q, cos, sin), RotaryFunction.apply(k, cos, sin)


def untested_rotary() -> str | None:
    """Why the installed Llama rotary functions are not those RotaryFunction was tested against, or None."""
    references = llama_references()
    return untested_code({name: references[name] for name in ("apply_rotary_pos_emb", "rotate_half")})


def llama_rotary_modules(model: torch.nn.Module) -> list:
    """The modeling modules of model's layers whose rotary embedding functions read as Llama's
    (none where Llama's own are untested: see untested_rotary)."""
    from transformers.models.llama import modeling_llama

    if untested_rotary():
        return []
    found = {}
    for layer in model.modules():
        module = sys.modules.get(type(layer).__module__)
        if module is None or module.__name__ in found:
            continue
        llama = (same_code(getattr(module, "apply_rotary_pos_emb", None), modeling_llama.apply_rotary_pos_emb)
                 and same_code(getattr(module, "rotate_half", None), modeling_llama.rotate_half))
        found[module.__name__] = module if llama else None
    return [module for module in found.values() if module is not None]


@contextlib.contextmanager
def fast_rotary_embeddings(model: torch.nn.Module):
    """Inside the block, model's Llama-family attention applies rotary embeddings through
    RotaryFunction on a CPU (module docstring); outside, even after an error, its modeling modules
    are as they were. Yields the number of modules changed."""
    swapped = {}
    try:
        for module in llama_rotary_modules(model):
            swapped[module] = module.apply_rotary_pos_emb
            module.apply_rotary_pos_emb = functools.partial(fast_apply_rotary_pos_emb, original=swapped[module])
        yield len(swapped)
    finally:
        for module, original in swapped.items():
            module.apply_rotary_pos_emb = original
