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
