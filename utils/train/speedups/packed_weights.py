"""Frozen bf16 matmuls on a CPU through weights packed once for oneDNN.

A LoRA run multiplies by the same frozen weights at every micro-batch. On a CPU, `F.linear` and
`mm` hand oneDNN a plain row-major weight, which it reorders into its blocked layout inside every
call. `torch.ops.mkldnn._reorder_linear_weight` does that once (what inductor's freezing pass does
for CPU inference), and `torch.ops.mkldnn._linear_pointwise` multiplies by the packed weight. The
result is the same to the last bit (same kernel, same order of sums); the matmuls are faster: on 2
cores of an AMD EPYC (bf16), SmolLM2's layer shapes at 500-740 tokens 410-440 against 340-420
GFLOP/s, its output head 396 against 348 forward and 346 against 290 for the input gradient
(bench/RESULTS.md has the training A/B).

`packed_frozen_linears` packs, for the duration of a block (finetune.py: the training loop), every
frozen bf16 `nn.Linear` of a model that lives on a CPU; the packs are freed when it ends. A layer's
forward pass then multiplies by its forward pack (the bias added in the same kernel, as F.linear
does); its input gradient uses the weight itself (a second pack for it gained nothing measurable,
for another copy of every weight). The output head also gets a backward pack, which the chunked
loss (utils/train/loss.py) uses: its input gradient, (tokens x vocabulary) @ (vocabulary x hidden), is
where the plain matmul is slowest. Memory: one packed copy of the frozen linear weights, two of the
head's (SmolLM2-135M: about 320 MB). Where that would take more than half the memory available,
nothing is packed (a 7B base in bf16 on a CPU: 13 GB more), and the run says so.
"""

import contextlib
import functools

import psutil
import torch

from utils.logs import logger
from utils.precision import cpu_native_bf16


@functools.cache
def _packing_ops_present() -> bool:
    """Whether this torch has oneDNN and the two ops used here (torch's own, private, used by
    inductor: a torch without them packs nothing)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and all(hasattr(torch.ops.mkldnn, op) for op in ("_reorder_linear_weight", "_linear_pointwise")))
    except (AttributeError, RuntimeError):
        return False


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether a weight can be packed: a 2-D bf16 weight on a CPU with native bf16 (utils/precision.py)."""
    return (weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.dim() == 2
            and cpu_native_bf16() and _packing_ops_present())


def _pack(weight: torch.Tensor) -> torch.Tensor:
    """weight (out, in) in oneDNN's blocked layout for x @ weight.T, for inputs of any number of rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)


def _times_packed(x: torch.Tensor, packed: torch.Tensor, *, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


class PackedWeight:
    """A frozen (out, in) weight packed for x @ weight.T, and with backward=True also for g @ weight."""

    def __init__(self, weight: torch.Tensor, *, backward: bool = False):
        self.weight = weight
        self.forward_pack = _pack(weight)
        self.backward_pack = _pack(weight.t()) if backward else None

    def times_transposed(self, x: torch.Tensor) -> torch.Tensor:
        """x @ weight.T (x in bf16; no autograd)."""
        return _times_packed(x, self.forward_pack)

    def times(self, gradient: torch.Tensor) -> torch.Tensor:
        """gradient @ weight (no autograd)."""
        if self.backward_pack is None:
            return gradient @ self.weight
        return _times_packed(gradient, self.backward_pack)


class _PackedLinear(torch.autograd.Function):
    """x @ weight.T + bias for a frozen weight and bias: the input's gradient only."""

    @staticmethod
    def forward(ctx, x, packed: PackedWeight, bias):
        ctx.packed = packed
        return _times_packed(x, packed.forward_pack, bias=bias)

    @staticmethod
    def backward(ctx, grad_output):
        return ctx.packed.times(grad_output), None, None


def _packed_forward(x: torch.Tensor, *, packed: PackedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    if packed.weight.requires_grad or (bias is not None and bias.requires_grad):  # unfrozen since
        return torch.nn.functional.linear(x, packed.weight, bias)
    # nn.Linear under autocast computes in bf16 whatever its input (PEFT and norms may pass float32).
    return _PackedLinear.apply(x.to(torch.bfloat16), packed, bias)


def packed_weight_of(module: torch.nn.Module) -> PackedWeight | None:
    """The packs of a module inside packed_frozen_linears, else None."""
    return module.__dict__.get("packed_weight")


def packable_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    """The frozen bf16 nn.Linear modules of model on a CPU that have no forward of their own (an
    accelerate hook, another patch) to keep."""
    return [module for module in model.modules()
            if type(module) is torch.nn.Linear and "forward" not in vars(module)
            and not module.weight.requires_grad and packing_supported(module.weight)
            and (module.bias is None or (not module.bias.requires_grad and module.bias.dtype == torch.bfloat16))]


@contextlib.contextmanager
def packed_frozen_linears(model: torch.nn.Module, *, head: torch.nn.Module | None = None):
    """Inside the block, every frozen bf16 nn.Linear of model on a CPU multiplies through packed
    weights (module docstring); head (the output head, if the loss applies it itself) also gets a
    pack for its input gradient. Outside, even after an error, the modules are as they were. Yields
    the number of modules packed."""
    modules = packable_linears(model)
    pack_bytes = sum(module.weight.nbytes * (2 if module is head else 1) for module in modules)
    available = psutil.virtual_memory().available
    if modules and pack_bytes > available / 2:
        logger.warning(f"Not packing the frozen weights for the CPU's matmuls (faster): they would take "
                       f"{pack_bytes / 2**20:.0f} MB more, with {available / 2**20:.0f} MB available")
        modules = []
    swapped = []
    try:
        for module in modules:
            packed = PackedWeight(module.weight, backward=module is head)
            module.packed_weight = packed
            module.forward = functools.partial(_packed_forward, packed=packed, bias=module.bias)
            swapped.append(module)
        yield len(swapped)
    finally:
        for module in swapped:
            del module.forward, module.packed_weight  # back to the class's forward; the packs are freed
