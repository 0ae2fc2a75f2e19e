"""The export stage: every export computes what base + adapter computes."""

import json
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ROOT, build_tiny_llama
from utils.export.gguf import GGUF_SUFFIX
from utils.export.meta_layout import meta_name
from utils.model_loading import load_model, load_tokenizer

PROBE = "def fibonacci(n):\n    "


def make_adapter(base: str, folder, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")):
    """A LoRA adapter with non-zero B (a fresh adapter's B is zero and would prove nothing)."""
    torch.manual_seed(0)
    model = get_peft_model(load_model(base), LoraConfig(r=4, lora_alpha=8, target_modules=list(targets)))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.02)
    model.save_pretrained(folder)
    return model.eval()


def run_export(*args):
    return subprocess.run([sys.executable, "export_checkpoint.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def logits(model, tokenizer):
    batch = tokenizer([PROBE], return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied"), tie_word_embeddings=True, seed=1)


@pytest.mark.parametrize("base_fixture", ["tiny_llama_dir", "tied_llama_dir", "smollm2_dir"])
@pytest.mark.slow
def test_hf_export_computes_what_base_plus_adapter_computes(request, base_fixture, tmp_path):
    base = str(request.getfixturevalue(base_fixture))
    adapted = make_adapter(base, tmp_path / "adapter")
    result = run_export("--base_model", base, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                        "--dtype", "float32", "--max_shard_size", "50MB")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "hf_ckpt"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    merged = AutoModelForCausalLM.from_pretrained(str(folder))
    assert merged.config.tie_word_embeddings == adapted.config.tie_word_embeddings
    tokenizer = load_tokenizer(str(folder))
    assert torch.allclose(logits(merged, tokenizer), logits(adapted, tokenizer), atol=1e-4)
    assert not list((tmp_path / "out").glob(".*"))  # no staging folder left


@pytest.mark.slow
def test_hf_export_is_sharded_and_serves_generate(smollm2_dir, tmp_path):
    make_adapter(str(smollm2_dir), tmp_path / "adapter", targets=("q_proj", "v_proj"))
    result = run_export("--base_model", "smollm2-135m", "--lora_weights", tmp_path / "adapter",
                        "--export_dir", tmp_path / "out", "--max_shard_size", "100MB")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "hf_ckpt"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3  # float16 135M params: about 270 MB
    answer = subprocess.run([sys.executable, "generate.py", "--base_model", str(folder), "--instruction", "Say hi.",
                             "--max_new_tokens", "8", "--temperature", "0"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr[-3000:]


def hf_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Meta's interleaved rotary layout -> HF's, as transformers' Llama converter applies it: the
    inverse of utils/export/meta_layout.py's meta_permute, written independently of it."""
    rows, columns = weight.shape
    return weight.reshape(heads, rows // heads // 2, 2, columns).transpose(1, 2).reshape(rows, columns)


@pytest.mark.slow
def test_pytorch_export_converts_back_to_the_merged_weights(tiny_llama_dir, tmp_path):
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter")
    for kind in ("hf", "pytorch"):
        result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter",
                            "--export_dir", tmp_path / "out", "--dtype", "float32", "--checkpoint_type", kind)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "\r" not in result.stderr  # stderr is a pipe, as a log file would be: no progress bar redrawn into it
    merged = load_file(str(tmp_path / "out" / "hf_ckpt" / "model.safetensors"))
    meta = torch.load(tmp_path / "out" / "ckpt" / "consolidated.00.pth")
    params = json.loads((tmp_path / "out" / "ckpt" / "params.json").read_text())
    assert params == {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": merged["model.embed_tokens.weight"].shape[0],
                      "norm_eps": 1e-6, "rope_theta": 10000.0, "ffn_dim": 128, "max_seq_len": 512}
    back = {}
    for name, tensor in merged.items():
        meta_tensor = meta[meta_name(name)]
        if name.endswith("q_proj.weight"):
            meta_tensor = hf_permute(meta_tensor, params["n_heads"])
        elif name.endswith("k_proj.weight"):
            meta_tensor = hf_permute(meta_tensor, params["n_kv_heads"])
        back[name] = meta_tensor
        assert torch.equal(meta_tensor, tensor), name
    assert back.keys() == merged.keys()
    assert set(meta) == {meta_name(name) for name in merged} | {"output.weight"}


@pytest.mark.parametrize("arguments, message", [
    (["--checkpoint_type", "onnx"], "--checkpoint_type must be hf, pytorch, gguf or gguf-lora"),
    (["--dtype", "int4"], "unknown dtype 'int4'"),
    (["--quantize", "q8_0"], "--quantize takes q8_0, q4_k_m, q5_k_m (comma-separated), with --checkpoint_type gguf"),
])
@pytest.mark.slow
def test_bad_arguments_fail_in_one_line(tiny_llama_dir, tmp_path, arguments, message):
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter")
    result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter",
                        "--export_dir", tmp_path / "out", *arguments)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message}")


def test_adapter_of_another_model_is_refused(tiny_llama_dir, tmp_path):
    other = build_tiny_llama(tmp_path / "wide", hidden_size=32)
    make_adapter(str(other), tmp_path / "adapter")
    result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "wrong --base_model?" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out" / "hf_ckpt").exists()


@pytest.mark.slow
def test_existing_export_is_kept_unless_overwrite(tiny_llama_dir, tmp_path):
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter")
    (tmp_path / "out" / "hf_ckpt").mkdir(parents=True)
    (tmp_path / "out" / "hf_ckpt" / "keep.txt").write_text("mine")
    args = ["--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out"]
    result = run_export(*args)
    assert result.returncode == 2 and "exists and is not empty: pass --overwrite" in result.stderr
    assert (tmp_path / "out" / "hf_ckpt" / "keep.txt").read_text() == "mine"
    assert run_export(*args, "--overwrite").returncode == 0
    assert (tmp_path / "out" / "hf_ckpt" / "config.json").is_file() and not (tmp_path / "out" / "hf_ckpt" / "keep.txt").exists()


# ---- llama.cpp ---------------------------------------------------------------------------------

def llama_cpp_greedy(path, prompt_ids, n_tokens):
    llama_cpp = pytest.importorskip("llama_cpp")
    model = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, verbose=False, logits_all=False)
    output = []
    for token in model.generate(prompt_ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        output.append(token)
        if len(output) == n_tokens:
            break
    return model, output


@pytest.mark.parametrize("base_fixture", ["smollm2_dir", "tiny_llama_dir"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.slow
def test_gguf_export_continues_like_transformers(request, base_fixture, dtype, tmp_path):
    pytest.importorskip("llama_cpp")
    base = str(request.getfixturevalue(base_fixture))
    adapted = make_adapter(base, tmp_path / "adapter", targets=("q_proj", "k_proj", "v_proj"))
    result = run_export("--base_model", base, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                        "--checkpoint_type", "gguf", "--dtype", dtype)
    assert result.returncode == 0, result.stderr[-3000:]
    path = tmp_path / "out" / "gguf" / f"ggml-model-{GGUF_SUFFIX[dtype]}.gguf"
    tokenizer = load_tokenizer(base)
    prompt_ids = tokenizer(PROBE)["input_ids"]
    model, continuation = llama_cpp_greedy(path, prompt_ids, 32)
    assert model.tokenize(PROBE.encode(), add_bos=tokenizer.bos_token_id in prompt_ids[:1], special=False) == prompt_ids
    with torch.no_grad():
        expected = adapted.generate(torch.tensor([prompt_ids]), max_new_tokens=32, do_sample=False,
                                    eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt_ids):].tolist()
    assert continuation == expected


@pytest.mark.slow
def test_gguf_quantized_to_q8_0_loads_and_generates(smollm2_dir, tmp_path):
    pytest.importorskip("llama_cpp")
    make_adapter(str(smollm2_dir), tmp_path / "adapter", targets=("q_proj", "v_proj"))
    result = run_export("--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                        "--checkpoint_type", "gguf", "--quantize", "q8_0")
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / "out" / "gguf"
    quantized, full = folder / "ggml-model-q8_0.gguf", folder / "ggml-model-f16.gguf"
    assert full.is_file() and quantized.is_file()
    assert quantized.stat().st_size < 0.7 * full.stat().st_size
    prompt_ids = load_tokenizer("smollm2-135m")(PROBE)["input_ids"]
    _, continuation = llama_cpp_greedy(quantized, prompt_ids, 8)
    assert len(continuation) == 8
