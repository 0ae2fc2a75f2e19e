"""LoRA's input path, cheaper: its dropout on a CPU, and no float32 copy of its input under autocast.

PEFT runs a LoRA layer as `lora_B(lora_A(dropout(x)))` with `nn.Dropout`, which on a CPU draws a
float32 mask with `bernoulli_`: one 32-bit random number per element (more of a SmolLM2 training
step than all its elementwise arithmetic: bench/RESULTS.md), and a 4-byte mask kept per element for
the backward pass. `use_fast_lora_dropout` swaps in `LoraDropout`, which on a CPU draws 15 random
bits per element (one 64-bit draw gives four) and turns them into a 0/1 mask in the input's dtype
by integer arithmetic on 16-bit lanes: multiplying by that vectorizes where a boolean mask does
not (about twice as fast forward, more backward: bench/RESULTS.md). The mask
kept for the backward pass is two bytes an element in half precision (four for a float32 input).

What is computed is nn.Dropout's: each element is kept with probability 1 - p and multiplied by
1/(1 - p), with p rounded to a multiple of 1/32768 (0.05 -> 0.0499878; the factor uses the rounded
p, so the expectation is the input). PEFT casts a LoRA layer's input to float32 first, where the
result is nn.Dropout's to the last bit (for that p). On a half-precision input the factor stays
exact where nn.Dropout rounds it to the input's dtype first (bf16: 1.0547 for 1.0526). The masks
come from torch's seeded default generator, so runs repeat, and activation checkpointing recomputes
the same mask (it restores that generator, as for nn.Dropout). On a GPU, nn.Dropout's kernel is
already fused, and LoraDropout calls it.

PEFT also casts each LoRA layer's input to the adapter's dtype (float32) before the dropout; under
autocast the LoRA matmuls cast it straight back to bf16. `skip_lora_input_copies` keeps the input as
it is there, on a CPU under autocast (elsewhere the cast stays; GPUs were not measured): the same
forward to the last bit, gradients within bf16 rounding (the tests check both), and a SmolLM2
training micro-batch faster (bench/RESULTS.md).
"""

import functools
import weakref

import torch
import torch.nn.functional as F

_FIFTEEN_BITS = 1 << 15
# The bits of 1.0 in each 16-bit float type: an int16 mask of these (or 0) is that type's 1.0 (or 0).
_ONE_BITS = {torch.bfloat16: 0x3F80, torch.float16: 0x3C00}


class _MaskedScale(torch.autograd.Function):
    """x * keep * scale, keep being 0/1 in x's dtype, kept for the backward pass."""

    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x.mul(keep).mul_(scale)

    @staticmethod
    def backward(ctx, grad_output):
        (keep,) = ctx.saved_tensors
        return grad_output.mul(keep).mul_(ctx.scale), None, None


def keep_factors(draws: torch.Tensor, *, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    """1 or 0 in dtype for each uniform int16 draw: 0 for exactly threshold of every 32768 values of
    its top 15 bits. Each draw shifted right once is uniform on [-16384, 16383], below
    threshold - 16384 for the dropped. (threshold - 16384 - 1) - draw is negative exactly for the
    kept (no overflow: it stays within [-32768, 32767]); shifted right by 15 that is all ones for
    them and 0 for the dropped, and its AND with 1.0's bits is 1.0 or 0. Other dtypes than the
    16-bit floats get a bf16 mask cast to theirs (a float32 input keeps a 4-byte mask)."""
    kept = torch.sub(threshold - _FIFTEEN_BITS // 2 - 1, draws >> 1).bitwise_right_shift_(15)
    bits_dtype = dtype if dtype in _ONE_BITS else torch.bfloat16
    return kept.bitwise_and_(_ONE_BITS[bits_dtype]).view(bits_dtype).to(dtype)


class LoraDropout(torch.nn.Module):
    """nn.Dropout(p) for a LoRA input; see the module docstring."""

    def __init__(self, p: float):
        super().__init__()
        # The probability the 15-bit draws give: p rounded to a multiple of 1/32768.
        self.threshold = round(p * _FIFTEEN_BITS) if 0 <= p < 1 else -1
        if not 0 <= self.threshold < _FIFTEEN_BITS:
            raise ValueError(f"dropout probability must be in [0, 1) and round below 1 in 1/32768ths, got {p}")
        self.p = p
        self.drawn_p = self.threshold / _FIFTEEN_BITS

    def keep_mask(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """1 with probability 1 - drawn_p, else 0, in dtype: four draws per int64 draw."""
        count = shape.numel()
        words = torch.empty((count + 3) // 4, dtype=torch.int64, device="cpu").random_(-(1 << 63), None)
        return keep_factors(words.view(torch.int16)[:count], threshold=self.threshold, dtype=dtype).view(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:  # p rounded to 0 drops nothing
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        return _MaskedScale.apply(x, self.keep_mask(x.shape, x.dtype), 1 / (1 - self.drawn_p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_fast_lora_dropout(model: torch.nn.Module) -> int:
    """Swap every LoRA layer's nn.Dropout for LoraDropout; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for adapter, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                dropouts[adapter] = LoraDropout(dropout.p).train(dropout.training)
                swapped += 1
    return swapped


def restore_lora_dropout(model: torch.nn.Module) -> int:
    """Undo use_fast_lora_dropout: nn.Dropout(p) again, in the mode each LoraDropout was in."""
    restored = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for adapter, dropout in dropouts.items():
                if type(dropout) is LoraDropout:
                    dropouts[adapter] = torch.nn.Dropout(dropout.p).train(dropout.training)
                    restored += 1
    return restored


def _cast_outside_autocast(x, dtype, *, layer):
    """PEFT's cast of a LoRA layer's input to the adapter's dtype, except on a CPU under autocast for
    a plain LoRA layer (no DoRA or other variant): there the LoRA matmuls run in autocast's dtype
    anyway, and the float32 copy of a bf16 input (and its gradient's on the way back) would be cast
    straight back."""
    if x is not None and x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not layer.lora_variant:
        return x
    return layer.__class__._cast_input_dtype(layer, x, dtype)  # layer is a weak proxy: not type(layer)


def skip_lora_input_copies(model: torch.nn.Module) -> int:
    """Every LoRA layer casts its input to float32 as _cast_outside_autocast says; returns how many
    layers were changed. What is computed does not change: dropout in the input's dtype scales
    exactly as in float32 (LoraDropout), and the LoRA matmuls under autocast round their input to
    autocast's dtype either way."""
    changed = 0
    for module in model.modules():
        # PEFT's private _cast_input_dtype and lora_variant: where a PEFT release has neither, nothing changes.
        if (hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype") and hasattr(module, "lora_variant")
                and "_cast_input_dtype" not in vars(module)):
            # A weak reference: the module's own attribute must not keep it alive (a cycle).
            module._cast_input_dtype = functools.partial(_cast_outside_autocast, layer=weakref.proxy(module))
            changed += 1
    return changed


def restore_lora_input_copies(model: torch.nn.Module) -> int:
    """Undo skip_lora_input_copies: PEFT's own cast on every LoRA layer again."""
    restored = 0
    for module in model.modules():
        if isinstance(vars(module).get("_cast_input_dtype"), functools.partial):
            del module._cast_input_dtype
            restored += 1
    return restored
