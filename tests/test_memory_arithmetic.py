"""The memory arithmetic of docs/hardware.md (bench/memory_arithmetic.py) against the bytes a real decoder layer saves."""

import pytest
import torch


def measured_saved_bytes(*, hidden, intermediate, heads, kv_heads, batch, seq_len, lora_r, lora_targets, lora_dropout):
    """Bytes a LlamaDecoderLayer (bf16, frozen) with PEFT LoRA saves for backward, deduplicated by storage."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=1, vocab_size=64)
    config._attn_implementation = "sdpa"

    class OneLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = LlamaDecoderLayer(config, 0).to(torch.bfloat16)
            self.rotary = LlamaRotaryEmbedding(config)

        def forward(self, hidden_states):
            positions = torch.arange(hidden_states.shape[1])[None]
            return self.layer(hidden_states, position_embeddings=self.rotary(hidden_states, positions),
                              position_ids=positions, attention_mask=None)

    model = get_peft_model(OneLayer(), LoraConfig(r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout,
                                                  target_modules=list(lora_targets))).train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = torch.randn(batch, seq_len, hidden, dtype=torch.bfloat16, requires_grad=True)  # a middle layer's input
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(inputs)
    return sum(saved.values())


@pytest.mark.parametrize("shape", [
    dict(hidden=256, intermediate=688, heads=4, kv_heads=4, batch=4, seq_len=128, lora_dropout=0.05),
    dict(hidden=256, intermediate=688, heads=4, kv_heads=4, batch=4, seq_len=128, lora_dropout=0.0),
    dict(hidden=256, intermediate=512, heads=4, kv_heads=2, batch=2, seq_len=64, lora_dropout=0.05),  # GQA
])
def test_activation_arithmetic_matches_a_real_layer(shape):
    import memory_arithmetic

    options = dict(shape, lora_r=16, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    expected = measured_saved_bytes(**options)
    assert memory_arithmetic.saved_activation_bytes(**options) == pytest.approx(expected, rel=0.02)


def test_the_recipe_fits_24_gb_only_with_checkpointing():
    import memory_arithmetic

    assert memory_arithmetic.training_memory(bits=8, checkpointing=True)["total"] < 22
    assert memory_arithmetic.training_memory(bits=8, checkpointing=False)["total"] > 24


# ---- sharding (FSDP): docs/hardware.md's "What fits where" and the README's hardware section ----

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_COUNTS = (1, 2, 4, 8)


def table_under(path, heading):
    """The lines of the first Markdown table in the section under heading (up to the next ## heading)."""
    text = path.read_text(encoding="utf-8")
    assert f"\n{heading}\n" in text, f"{path.name} has no {heading!r}"
    section = text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def cells(lines):
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]


def test_the_readme_table_is_what_the_script_computes():
    import memory_arithmetic

    shown = cells(table_under(ROOT / "README.md", "## Hardware: what fits where"))
    assert shown == cells(memory_arithmetic.readme_table())


def test_the_hardware_doc_table_is_what_the_script_computes():
    import memory_arithmetic

    shown = cells(table_under(ROOT / "docs" / "hardware.md", "## What fits where: one GPU or several (FSDP)"))
    assert shown == cells(memory_arithmetic.sharding_table())
    assert len(shown) == 2 + len(memory_arithmetic.MODELS) * 2 * 2  # header, rule, model x method x checkpointing


@pytest.mark.parametrize("name", ["Llama-2-7B", "Llama-2-13B", "Qwen2.5-Coder-32B", "Code Llama 34B", "Llama-2-70B"])
@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_per_gpu_peak_falls_with_the_number_of_gpus(name, bits, checkpointing):
    import memory_arithmetic

    model = memory_arithmetic.MODELS[name]
    peaks = [memory_arithmetic.sharded_training_memory(model=model, bits=bits, gpus=gpus, checkpointing=checkpointing)
             for gpus in GPU_COUNTS]
    totals = [peak["total"] for peak in peaks]
    assert totals == sorted(totals, reverse=True) and len(set(totals)) == len(totals)
    for peak in peaks:
        assert peak["total"] == pytest.approx(sum(value for part, value in peak.items() if part != "total"))
    # What sharding divides: the frozen weights and the LoRA states; not the micro-batch's activations.
    assert peaks[1]["LoRA + AdamW"] == pytest.approx(peaks[0]["LoRA + AdamW"] / 2)
    assert peaks[3]["LoRA + AdamW"] == pytest.approx(peaks[0]["LoRA + AdamW"] / 8)
    assert len({peak["activations"] for peak in peaks[1:]}) == 1
    assert len({peak["logits"] for peak in peaks}) == 1


@pytest.mark.parametrize("bits", [16, 4])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_one_gpu_is_the_single_gpu_arithmetic(bits, checkpointing):
    import memory_arithmetic

    for model in memory_arithmetic.MODELS.values():
        single = memory_arithmetic.training_memory(model=model, bits=bits, checkpointing=checkpointing)
        sharded = memory_arithmetic.sharded_training_memory(model=model, bits=bits, gpus=1, checkpointing=checkpointing)
        assert sharded["total"] == pytest.approx(single["total"] + memory_arithmetic.CUDA_OVERHEAD_GIB)
        assert {name: sharded[name] for name in single} == {**single, "total": sharded["total"]}


def test_the_7b_rows_keep_docs_numbers_and_the_gpu_measurements():
    """The 1-GPU QLoRA 7B row is the 4-bit row above it in docs/hardware.md (10.9 GiB) plus the CUDA
    overhead, within 5% of bench_gpu.py's 11.2 GiB measured on an H100 (bench/RESULTS.md)."""
    import memory_arithmetic

    qlora = memory_arithmetic.sharded_training_memory(bits=4, gpus=1, checkpointing=True)
    assert round(qlora["total"] - qlora["overhead"], 1) == 10.9
    assert qlora["total"] - qlora["overhead"] == pytest.approx(11.2, rel=0.05)
    with pytest.raises(ValueError):
        memory_arithmetic.sharded_training_memory(bits=8, gpus=2, checkpointing=True)


SMALL = dict(hidden=256, intermediate=688, heads=4, kv_heads=4, layers=3, vocab=64)


@pytest.fixture(scope="module")
def small_layer_bytes():
    """What one real decoder layer of SMALL's shape saves at 4 x 128 tokens (measured once)."""
    return measured_saved_bytes(hidden=256, intermediate=688, heads=4, kv_heads=4, batch=4, seq_len=128, lora_r=16,
                                lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"), lora_dropout=0.05)


@pytest.mark.parametrize("gpus", [1, 2, 8])
@pytest.mark.parametrize("bits", [16, 4])
def test_the_sharded_activations_are_the_measured_layer(gpus, bits, small_layer_bytes):
    """The activation part of every column is layers x the bytes a real decoder layer saves
    (checkpointing off), or each layer's input plus one such layer (on), to the existing tolerance."""
    import memory_arithmetic

    batch, seq_len, layer = 4, 128, small_layer_bytes
    residual_bytes = 4 if (bits == 4 and gpus == 1) else 2  # fp32 residual stream only on one GPU's QLoRA
    for checkpointing, expected in ((False, SMALL["layers"] * layer),
                                    (True, SMALL["layers"] * batch * seq_len * SMALL["hidden"] * residual_bytes + layer)):
        parts = memory_arithmetic.sharded_training_memory(model=SMALL, bits=bits, gpus=gpus, checkpointing=checkpointing,
                                                          batch=batch, seq_len=seq_len)
        assert parts["activations"] * memory_arithmetic.GIB == pytest.approx(expected, rel=0.02)
