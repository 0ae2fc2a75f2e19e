"""Attention over a packed row of examples of mixed lengths, three ways, forward + backward.

    python bench/bench_packed_attention.py [--examples 16] [--min_len 64] [--max_len 512] [--repeats 10]

- per-example: finetune.py's `sdpa_per_example` with one SDPA call per example;
- varlen: the same, with torch's varlen flash attention (one call for the row; CUDA, half precision);
- dense mask: SDPA over the whole row with a block-diagonal causal mask (what transformers' `sdpa`
  does with a packed row).
On Llama-2-7B's attention shape (32 heads, head_dim 128) and Qwen2.5-Coder-7B's (28 query heads, 4
key/value heads). Reported: milliseconds (median), peak memory added (GPU), and the largest
difference of the output and the gradients from the per-example path (relative to the largest value).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.train import attention  # noqa: E402

SHAPES = {"Llama-2-7B": (32, 32, 128), "Qwen2.5-Coder-7B": (28, 4, 128)}


def packed_inputs(lengths, heads, kv_heads, head_dim, device, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def tensor(h):  # transformers' layout: (batch, heads, length, head_dim), a transposed view
        return torch.randn(1, total, h, head_dim, generator=generator).to(device, dtype).transpose(1, 2).requires_grad_()

    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    return tensor(heads), tensor(kv_heads), tensor(kv_heads), positions


def dense_mask_attention(query, key, value, positions):
    example = (positions[0] == 0).cumsum(0)
    same = example[:, None] == example[None, :]
    causal = torch.ones_like(same).tril_()
    output = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=same & causal,
                                                              enable_gqa=key.shape[1] != query.shape[1])
    return output.transpose(1, 2)


def run(method, query, key, value, positions):
    module = SimpleNamespace(training=True)
    if method == "dense mask":
        return dense_mask_attention(query, key, value, positions)
    if method == "per-example":
        with mock.patch.object(attention, "use_varlen_attention", return_value=False):
            return attention.per_example_sdpa(module, query, key, value, None, position_ids=positions)[0]
    return attention.per_example_sdpa(module, query, key, value, None, position_ids=positions)[0]


def measure(method, inputs, repeats, cuda):
    def once():
        for tensor in inputs[:3]:
            tensor.grad = None
        output = run(method, *inputs)
        output.backward(torch.ones_like(output))
        return output

    once()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        output = once()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    return statistics.median(times) * 1e3, peak, output.detach(), [t.grad.detach().clone() for t in inputs[:3]]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=16)
    parser.add_argument("--min_len", type=int, default=64)
    parser.add_argument("--max_len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    options = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.bfloat16)
    lengths = torch.randint(options.min_len, options.max_len + 1, (options.examples,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    card = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{card}; torch {torch.__version__}; bf16; {options.examples} examples of {options.min_len}-{options.max_len} "
          f"tokens ({sum(lengths)} in the row); forward + backward, median of {options.repeats}")
    print()
    print("| shape | attention | ms | peak memory added (MiB) | largest difference from per-example, relative to its largest value (output, grads of q, k, v) |")
    print("| --- | --- | ---: | ---: | --- |")
    for name, (heads, kv_heads, head_dim) in SHAPES.items():
        inputs = packed_inputs(lengths, heads, kv_heads, head_dim, device, dtype)
        reference = None
        for method in ["per-example", "varlen", "dense mask"]:
            if method == "varlen" and not attention.use_varlen_attention(inputs[0], inputs[1], dropout=0.0):
                print(f"| {name} | {method} | - | - | not available here (it needs CUDA on compute capability 8.0+, "
                      f"torch 2.11+ with varlen_attn, and 2.12+ for grouped-query heads) |")
                continue
            milliseconds, peak, output, grads = measure(method, inputs, options.repeats, cuda)
            if reference is None:
                reference = (output, grads)
                difference = "-"
            else:
                difference = ", ".join(f"{((a.float() - b.float()).abs().max() / b.float().abs().max()).item():.2g}"
                                       for a, b in zip([output, *grads], [reference[0], *reference[1]]))
            memory = "-" if peak is None else f"{peak:.0f}"
            print(f"| {name} | {method} | {milliseconds:.2f} | {memory} | {difference} |", flush=True)


if __name__ == "__main__":
    main()
