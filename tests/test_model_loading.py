import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from conftest import ROOT
from utils.errors import CodeUpError
from utils.model_loading import (
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_dtype,
    resolve_model_reference,
    smollm2_gguf_path,
)
from utils.prompter import Prompter


def greedy(model, tokenizer, prompts, max_new_tokens=8):
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    return output[:, batch["input_ids"].shape[1]:].tolist()


def test_local_folder_loads_with_distinct_pad_and_padding_sides(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), padding_side="left")
    assert tokenizer.padding_side == "left"
    assert tokenizer.pad_token_id not in (None, tokenizer.eos_token_id)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert next(model.parameters()).device.type == "cpu"
    assert load_tokenizer(str(tiny_llama_dir)).padding_side == "right"


def test_left_padded_batch_generates_what_each_prompt_generates_alone(tiny_llama_dir):
    model, tokenizer = load_model_and_tokenizer(str(tiny_llama_dir), padding_side="left")
    prompts = [Prompter().generate_prompt("Write a function."), Prompter().generate_prompt("Sort.", "[3, 1]")]
    batched = greedy(model, tokenizer, prompts)
    alone = [greedy(model, tokenizer, [prompt])[0] for prompt in prompts]
    assert batched == alone


def test_tokenizer_without_unk_gets_a_new_pad_token_and_embedding(tiny_llama_dir, tmp_path):
    folder = tmp_path / "no-unk"
    shutil.copytree(tiny_llama_dir, folder)
    tokenizer = load_tokenizer(str(folder))
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.unk_token = tokenizer.eos_token
    tokenizer.save_pretrained(folder)
    model, tokenizer = load_model_and_tokenizer(str(folder))
    assert tokenizer.pad_token == "<pad>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)


@pytest.mark.slow
def test_smollm2_alias_is_a_plain_hf_folder_equal_to_the_gguf(smollm2_dir):
    from transformers import AutoModelForCausalLM

    assert (smollm2_dir / "config.json").is_file() and (smollm2_dir / "model.safetensors").is_file()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()
    model, tokenizer = load_model_and_tokenizer("smollm2-135m")
    assert model.config.model_type == "llama" and model.num_parameters() > 100_000_000
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    batch = tokenizer(["def fibonacci(n):"], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_smollm2_answers_an_instruction(smollm2_dir):
    model, tokenizer = load_model_and_tokenizer("smollm2-135m", padding_side="left")
    prompter = Prompter()
    prompt = prompter.generate_prompt("Write a Python function that adds two numbers.")
    text = tokenizer.decode(greedy(model, tokenizer, [prompt], max_new_tokens=40)[0], skip_special_tokens=True)
    assert "def " in prompter.response_from_continuation(text)


def test_smollm2_pad_is_not_eos(smollm2_dir):
    tokenizer = load_tokenizer("smollm2-135m")
    assert tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id


def test_gguf_file_path_resolves_to_the_same_converted_folder(smollm2_dir):
    assert resolve_model_reference(str(smollm2_gguf_path())) == str(smollm2_dir)


def test_hub_id_loads_from_the_hub_cache(tiny_llama_dir, tmp_path):
    # A hub id goes to transformers' hub loading; offline, it is served from the hub cache, laid out
    # here as huggingface_hub lays out a download.
    snapshot = tmp_path / "hub" / "models--codeup-test--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    code = (
        "from utils.model_loading import load_model_and_tokenizer\n"
        "model, tokenizer = load_model_and_tokenizer('codeup-test/tiny-llama')\n"
        "print(model.config.hidden_size, tokenizer.pad_token_id != tokenizer.eos_token_id)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["64", "True"]


@pytest.mark.parametrize("reference, message", [
    ("./no/such/model", "not found"),
    ("/definitely/missing.gguf", "not found"),
    ("not a model name!", "not found"),
])
def test_unresolvable_references_raise_clear_errors(reference, message):
    with pytest.raises(CodeUpError, match=message):
        resolve_model_reference(reference)


def test_folder_without_config_is_refused_with_a_hint(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CodeUpError, match="no config.json.*lora_weights"):
        resolve_model_reference(str(tmp_path))


def test_unknown_hub_id_offline_raises_a_clear_error():
    with pytest.raises(CodeUpError, match="cannot load the tokenizer of 'codeup-test/does-not-exist'"):
        load_tokenizer("codeup-test/does-not-exist")


def test_cli_reports_a_missing_model_in_one_line_without_traceback():
    result = subprocess.run(
        [sys.executable, "generate.py", "--base_model", "./no/such/model", "--instruction", "hi"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: model './no/such/model' not found")


def test_8bit_loading_on_cpu_runs_and_stays_close(tiny_llama_dir):
    import bitsandbytes as bnb

    full = load_model(str(tiny_llama_dir))
    quantized = load_model(str(tiny_llama_dir), load_in_8bit=True)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    assert quantized.get_memory_footprint() < full.get_memory_footprint()
    batch = load_tokenizer(str(tiny_llama_dir))(["def add(a, b):"], return_tensors="pt")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected, actual = full(**batch).logits, quantized(**batch).logits
    assert torch.isfinite(actual).all()
    assert torch.allclose(actual, expected, atol=0.05 * expected.abs().max().item())


def test_4bit_loading_on_cpu_runs(tiny_llama_dir):
    import bitsandbytes as bnb

    quantized = load_model(str(tiny_llama_dir), load_in_4bit=True)
    assert isinstance(quantized.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    batch = load_tokenizer(str(tiny_llama_dir))(["def add(a, b):"], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(quantized(**batch).logits).all()


def test_8bit_and_4bit_together_are_refused(tiny_llama_dir):
    with pytest.raises(CodeUpError, match="one of load_in_8bit and load_in_4bit"):
        load_model(str(tiny_llama_dir), load_in_8bit=True, load_in_4bit=True)


def test_dtype_names():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("float16") is torch.float16
    assert resolve_dtype("auto", device="cpu") is torch.float32
    with pytest.raises(CodeUpError, match="unknown dtype"):
        resolve_dtype("float8")
