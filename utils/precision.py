"""The one precision policy of every stage: what `auto` means, and the names each flag accepts.

| stage                  | GPU with native bf16 (compute capability 8.0+: A100, RTX 30xx/40xx, H100) | older GPU (T4, V100, RTX 20xx) | CPU with native bf16 (AVX512-BF16, AMX) | other CPU |
| ---------------------- | ------------ | ------- | ------- | ------- |
| training               | bf16         | fp16    | bf16    | fp32    |
| generation, evaluation | bf16         | fp16    | fp32    | fp32    |
| 8-bit base, generation and evaluation | fp16 | fp16 | fp32 | fp32 |
| export                 | fp16 (the base checkpoints' own dtype, what llama.cpp and most tools expect) ||||

Why: bf16 has fp32's range (no loss scaling) and runs at full speed only where the hardware has
it; torch.cuda.is_bf16_supported also answers True on cards that merely *emulate* bf16 (slowly,
and without the fast attention kernels), so native support is read from the compute capability.
Generation on a CPU stays in fp32: decoding is memory-bound there and bf16 would change greedy
answers against the fp32 reference for no speed. bitsandbytes' 8-bit matmul quantizes its inputs
to fp16 whatever they were, so an 8-bit base on a GPU computes in fp16.
"""

import functools
from pathlib import Path

import torch

from utils.errors import CodeUpError
from utils.logs import silence_notice

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}
STAGES = ("training", "generation", "evaluation", "export")


def cuda_native_bf16(device_index: int | None = None) -> bool:
    """True on GPUs that compute in bf16 natively (Ampere, compute capability 8.0, and newer)."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device_index)
    return major >= 8


@functools.cache
def cpu_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (x86 AVX512-BF16 or AMX, Arm BF16), read from
    the kernel's CPU flags (public, and no private torch API)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def normalize(name: str) -> str:
    """bf16, fp16, fp32 or auto, for any accepted spelling (bfloat16, float16, float32, ...)."""
    key = str(name).lower()
    key = ALIASES.get(key, key)
    if key != "auto" and key not in PRECISIONS:
        raise CodeUpError(f"unknown dtype {name!r}: use auto, bf16, fp16 or fp32 (or {', '.join(ALIASES)})")
    return key


def resolve_precision(name: str = "auto", *, stage: str, device: str, quantized_8bit: bool = False) -> str:
    """The precision a stage runs in: bf16, fp16 or fp32 (see the table above)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    name = normalize(name)
    cuda = str(device).startswith("cuda")
    if name == "fp16" and not cuda and stage == "training":
        raise CodeUpError("--precision fp16 needs a GPU; use bf16 or fp32 on a CPU")
    if name != "auto":
        return name
    if stage == "export":
        return "fp16"
    if cuda:
        if quantized_8bit and stage != "training":
            return "fp16"
        return "bf16" if cuda_native_bf16() else "fp16"
    if stage == "training":
        return "bf16" if cpu_native_bf16() else "fp32"
    return "fp32"


def torch_dtype(name: str) -> torch.dtype:
    return PRECISIONS[normalize(name)]


def enable_tf32() -> bool:
    """Let fp32 matmuls use TF32 tensor cores where the GPU has them (compute capability 8.0+).
    With an 8-bit base, PEFT keeps norms and embeddings in fp32, so the residual stream and the
    backward matmuls run in fp32: TF32 makes them several times faster at no practical cost.
    Returns whether it turned TF32 on."""
    if not cuda_native_bf16():
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def silence_bitsandbytes_cast_notice() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" on every 8-bit
    matmul whose input is not fp16 (hundreds of lines a training step); that cast is by design."""
    silence_notice("bitsandbytes.autograd._functions", "inputs will be cast")
