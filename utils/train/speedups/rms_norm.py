"""RMSNorm with a hand-written backward, for the frozen half-precision norms of a LoRA run on a CPU.

transformers' Llama-family RMSNorm (LlamaRMSNorm and its copies, word for word, in about 140 models:
Mistral, Mixtral, Qwen2/3 and their MoEs, Phi-3, Granite, DeepSeek-V2/3, GLM-4, SmolLM3...; not
Gemma's 1 + weight or OLMo2's, which differ) upcasts its bf16 input to float32 and leaves
the rest to autograd, whose backward runs through pow, mean, rsqrt and both casts and keeps float32
copies of the hidden states for it. `RMSNormFunction` computes the same formula in fewer passes and
keeps the bf16 input and one float32 per token. The same forward to the last bit, the input
gradient within bf16 rounding (the tests compare each class; measured, it was bit-equal too), in
about two thirds of the time (bench/RESULTS.md); a SmolLM2 micro-batch runs 61 norms. Elsewhere (a GPU, float32, a norm being trained) the module's own forward runs, and
where the installed LlamaRMSNorm is not the code RMSNormFunction was tested against
(utils/train/speedups/source_code.py) no norm is changed (utils/train/speedups/'s line says so).
"""

import functools
import weakref

import torch

from utils.train.speedups.source_code import llama_references, same_code, untested_code


class RMSNormFunction(torch.autograd.Function):
    """weight * (x * rsqrt(mean(x²) + eps)), in float32 and rounded to x's dtype before the
    weight, as LlamaRMSNorm computes it; weight frozen, x in half precision."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        variance = x.float().pow_(2).mean(-1, keepdim=True)  # x.float() is a copy: x is half precision
        rstd = variance.add_(eps).rsqrt_()
        normed = torch.mul(x, rstd, out=torch.empty_like(x))  # the float32 product, rounded once
        ctx.save_for_backward(x, rstd, weight)
        return normed.mul_(weight)

    @staticmethod
    def backward(ctx, grad_output):
        x, rstd, weight = ctx.saved_tensors
        grad_normed = (grad_output * weight).float()
        # d/dx of x * rstd(x): rstd * g - x * rstd³ * mean(g * x)
        coefficient = (grad_normed * x).sum(-1, keepdim=True).mul_(rstd.pow(3)).div_(-x.shape[-1])
        return grad_normed.mul_(rstd).addcmul_(x, coefficient).to(x.dtype), None, None


def _rms_norm_forward(hidden_states: torch.Tensor, *, module: torch.nn.Module) -> torch.Tensor:
    weight = module.weight
    if (hidden_states.device.type != "cpu" or hidden_states.dtype not in (torch.bfloat16, torch.float16)
            or weight.dtype != hidden_states.dtype or weight.requires_grad):
        return module.__class__.forward(module, hidden_states)  # module is a weak proxy: not type(module)
    return RMSNormFunction.apply(hidden_states, weight, module.variance_epsilon)


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """Whether module's class computes LlamaRMSNorm's forward, read from the source (utils/train/speedups/source_code.py)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return same_code(type(module).forward, LlamaRMSNorm.forward)


def untested_rms_norm() -> str | None:
    """Why the installed LlamaRMSNorm is not the code RMSNormFunction was tested against, or None."""
    return untested_code({"LlamaRMSNorm.forward": llama_references()["LlamaRMSNorm.forward"]})


def restore_rms_norm(model: torch.nn.Module) -> int:
    """Undo use_fast_rms_norm: every norm's own class forward again."""
    restored = 0
    for module in model.modules():
        forward = vars(module).get("forward")
        if isinstance(forward, functools.partial) and forward.func is _rms_norm_forward:
            del module.forward
            restored += 1
    return restored


def use_fast_rms_norm(model: torch.nn.Module) -> int:
    """Every Llama-family RMSNorm of model computes through RMSNormFunction where it applies (see
    the module docstring); returns how many norms were changed."""
    if untested_rms_norm():
        return 0
    changed = 0
    for module in model.modules():
        if "forward" not in vars(module) and is_llama_rms_norm(module):
            # A weak reference: the module's own attribute must not keep it alive (a cycle).
            module.forward = functools.partial(_rms_norm_forward, module=weakref.proxy(module))
            changed += 1
    return changed
