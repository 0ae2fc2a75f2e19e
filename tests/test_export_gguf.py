"""GGUF through llama.cpp's own converter: the adapter alone as a GGUF LoRA, quantized files, and
SmolLM2's real pre-tokenizer (what the converter recognises a BPE tokenizer by)."""

import json

import numpy as np
import pytest

from test_export import make_adapter, run_export
from test_export_prompt import gguf_chat_template

IDS = [1, 5, 17, 42, 99, 7, 250, 3, 64, 128, 12, 77, 31, 200, 9, 45]


def llama_cpp_logits(path, ids, **options):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, logits_all=True, verbose=False, **options)
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def gguf_string(path, key):
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields[key]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def test_smollm2_folder_carries_its_real_pre_tokenizer(smollm2_dir):
    pre = json.loads((smollm2_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    assert [step["type"] for step in pre["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert pre["pretokenizers"][0]["individual_digits"]


@pytest.mark.slow
def test_gguf_lora_on_the_base_gives_the_merged_logits(tiny_llama_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"))
    for kind in ("gguf", "gguf-lora"):
        result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                            "--checkpoint_type", kind, "--dtype", "float32")
        assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "gguf-lora"
    merged = llama_cpp_logits(tmp_path / "out" / "gguf" / "ggml-model-f32.gguf", IDS)
    with_lora = llama_cpp_logits(folder / "base-f32.gguf", IDS, lora_path=str(folder / "lora-f32.gguf"))
    base_only = llama_cpp_logits(folder / "base-f32.gguf", IDS)
    assert np.abs(with_lora - merged).max() <= 5e-3
    assert (with_lora.argmax(-1) == merged.argmax(-1)).all()
    assert np.abs(base_only - merged).max() > 0.05  # the adapter matters: the comparison proves something
    assert gguf_chat_template(folder / "base-f32.gguf") == gguf_chat_template(tmp_path / "out" / "gguf" / "ggml-model-f32.gguf")
    modelfile = (folder / "Modelfile.f32").read_text()
    assert modelfile.startswith("FROM ./base-f32.gguf\nADAPTER ./lora-f32.gguf\nTEMPLATE")


@pytest.mark.slow
def test_smollm2_gguf_quantized_by_llama_cpp(smollm2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    make_adapter(str(smollm2_dir), tmp_path / "adapter", targets=("q_proj", "v_proj"))
    result = run_export("--base_model", smollm2_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                        "--checkpoint_type", "gguf", "--quantize", "q8_0,q4_k_m,q5_k_m")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "gguf"
    full = folder / "ggml-model-f16.gguf"
    assert gguf_string(full, "tokenizer.ggml.pre") == "smollm"
    reference = llama_cpp_logits(full, IDS)
    for quantization, ratio in [("q8_0", 0.7), ("q5_k_m", 0.6), ("q4_k_m", 0.6)]:
        path = folder / f"ggml-model-{quantization}.gguf"
        assert path.stat().st_size < ratio * full.stat().st_size
        assert gguf_chat_template(path) == gguf_chat_template(full)
        assert (folder / f"Modelfile.{quantization}").read_text().startswith(f"FROM ./ggml-model-{quantization}.gguf\n")
        logits = llama_cpp_logits(path, IDS)
        agreement = (logits.argmax(-1) == reference.argmax(-1)).mean()
        assert agreement >= 0.75, (quantization, agreement)
