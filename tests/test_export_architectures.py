"""Every modern architecture reaches llama.cpp: tiny random models with their family's real
tokenizer (llama.cpp's vocab-only GGUFs, installed by setup.sh), trained a few steps by finetune.py,
exported to hf (== base + adapter) and GGUF (llama.cpp's logits == transformers')."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import SHARED_DATA
from test_export import run_export
from utils.model_loading import fit_model_to_tokenizer, load_model, load_tokenizer

VOCABS = Path(sys.prefix) / "share" / "codeup-llama.cpp" / "models"
PROBE = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)  # 32 tokens or more"

FAMILIES = {
    "qwen2-tied": ("qwen2", "Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen2", "Qwen3Config", dict(head_dim=16)),
    "starcoder2": ("starcoder", "Starcoder2Config", dict(use_bias=True)),
    "mistral": ("llama-spm", "MistralConfig", dict(sliding_window=None)),
    "llama3": ("llama-bpe", "LlamaConfig", dict(rope_theta=500000.0)),
}


def build_family(folder: Path, vocab: str, config_class: str, options: dict) -> Path:
    import transformers

    tokenizer = AutoTokenizer.from_pretrained(str(VOCABS), gguf_file=f"ggml-vocab-{vocab}.gguf")
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **options,
    )
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # random weights big enough that the logits differ from token to token
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(std=0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train(base: Path, output: Path) -> Path:
    import finetune

    if not (SHARED_DATA / "code_alpaca_20k.json").is_file():
        pytest.skip("../shared/data is not here")
    records = json.loads((SHARED_DATA / "code_alpaca_20k.json").read_text(encoding="utf-8"))[:16]
    data = output.parent / "records.json"
    data.write_text(json.dumps(records))
    finetune.train(base_model=str(base), data_path=str(data), output_dir=str(output), batch_size=4, micro_batch_size=2,
                   max_steps=3, warmup_steps=0, cutoff_len=64, val_set_size=0, lora_r=4, lora_alpha=8,
                   learning_rate=3e-2, report_to="none")
    return output


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_to_hf_and_gguf(family, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    if not VOCABS.is_dir():
        pytest.skip("llama.cpp's vocab GGUFs are not installed (bash setup.sh)")
    base = build_family(tmp_path / "base", *FAMILIES[family])
    adapter = train(base, tmp_path / "lora")

    tokenizer = load_tokenizer(str(base))
    reference = load_model(str(base), dtype="float32")
    fit_model_to_tokenizer(reference, tokenizer)
    reference = PeftModel.from_pretrained(reference, str(adapter)).eval()
    ids = tokenizer(PROBE, add_special_tokens=False)["input_ids"][:32]
    assert len(ids) == 32
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0].float()

    for kind in ("hf", "gguf"):
        result = run_export("--base_model", base, "--lora_weights", adapter, "--export_dir", tmp_path / "out",
                            "--checkpoint_type", kind, "--dtype", "float32")
        assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf_ckpt"), dtype=torch.float32).eval()
    with torch.no_grad():
        merged_logits = merged(torch.tensor([ids])).logits[0]
    assert (merged_logits - expected).abs().max().item() <= 1e-4

    model = llama_cpp.Llama(model_path=str(tmp_path / "out" / "gguf" / "ggml-model-f32.gguf"), n_ctx=64, n_threads=2,
                            logits_all=True, verbose=False)
    model.eval(ids)
    llama_logits = torch.from_numpy(np.array(model.scores[: len(ids)], dtype=np.float32))
    vocab = min(llama_logits.shape[1], expected.shape[1])
    largest_difference = (llama_logits[:, :vocab] - expected[:, :vocab]).abs().max().item()
    assert largest_difference <= 5e-3
    # The same next token wherever transformers' top two logits are further apart than twice the
    # largest difference (closer, the two may swap within that difference: a tie, not a bug).
    top_two = expected[:, :vocab].topk(2, dim=-1).values
    clear = (top_two[:, 0] - top_two[:, 1]) > 2 * largest_difference
    assert clear.sum() >= len(ids) // 2
    assert torch.equal(llama_logits[:, :vocab].argmax(-1)[clear], expected[:, :vocab].argmax(-1)[clear])
