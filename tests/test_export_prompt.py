"""Exports carry the training prompt: hf_ckpt's chat template, the GGUF's, the Ollama Modelfile."""

import json
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from conftest import ROOT, SHARED_DATA
from test_export import make_adapter, run_export
from utils.prompter import Prompter, load_template, save_template_record

CUSTOM = dict(load_template("alpaca"), prompt_no_input="Task: {instruction}\n\nAnswer in code:\n", response_split="Answer in code:")


def instructions(count=50):
    if not (SHARED_DATA / "code_alpaca_20k.json").is_file():
        pytest.skip("../shared/data is not here")
    records = json.loads((SHARED_DATA / "code_alpaca_20k.json").read_text(encoding="utf-8"))
    return [record["instruction"] for record in records[:count]]


def gguf_chat_template(path) -> str:
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields["tokenizer.chat_template"]
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def render(tokenizer, instruction):
    return tokenizer.apply_chat_template([{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("name, template", [("alpaca", load_template("alpaca")), ("mine", CUSTOM)])
@pytest.mark.slow
def test_hf_and_gguf_exports_render_the_training_prompt(tiny_llama_dir, tmp_path, name, template):
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter", targets=("q_proj",))
    save_template_record(tmp_path / "adapter", name=name, template=template)  # as finetune.py does
    for kind in ("hf", "gguf"):
        result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter",
                            "--export_dir", tmp_path / "out", "--dtype", "float32", "--checkpoint_type", kind)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"chat template: the {name!r} training prompt" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "hf_ckpt"))
    prompter = Prompter(template)
    for instruction in instructions():
        assert render(tokenizer, instruction) == prompter.generate_prompt(instruction)
    gguf_path = tmp_path / "out" / "gguf" / "ggml-model-f32.gguf"
    assert gguf_chat_template(gguf_path) == tokenizer.chat_template
    modelfile = (tmp_path / "out" / "gguf" / "Modelfile.f32").read_text()
    assert modelfile.startswith("FROM ./ggml-model-f32.gguf\nTEMPLATE \"\"\"")
    assert f'PARAMETER stop "{template["response_split"]}"' in modelfile


def test_explicit_template_overrides_the_record_with_a_warning(tiny_llama_dir, tmp_path):
    make_adapter(str(tiny_llama_dir), tmp_path / "adapter", targets=("q_proj",))
    save_template_record(tmp_path / "adapter", name="mine", template=CUSTOM)
    result = run_export("--base_model", tiny_llama_dir, "--lora_weights", tmp_path / "adapter",
                        "--export_dir", tmp_path / "out", "--prompt_template", "alpaca_short")
    assert result.returncode == 0 and "warning: " in result.stderr and "'mine'" in result.stderr
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "hf_ckpt"))
    assert render(tokenizer, "Sort.") == Prompter("alpaca_short").generate_prompt("Sort.")


@pytest.mark.slow
def test_chat_tuned_adapter_keeps_the_base_chat_template(smollm2_dir, tmp_path):
    make_adapter(str(smollm2_dir), tmp_path / "adapter", targets=("q_proj",))
    (tmp_path / "adapter" / "prompt_template.json").write_text(json.dumps({"name": "chat", "template": None}))
    result = run_export("--base_model", smollm2_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    exported = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "hf_ckpt"))
    assert exported.chat_template == AutoTokenizer.from_pretrained(str(smollm2_dir)).chat_template
    assert "<|im_start|>" in render(exported, "hi")


@pytest.mark.slow
def test_llama_cpp_chat_completion_answers_like_generate_py(smollm2_dir, tmp_path):
    """llama-cpp-python's create_chat_completion with the GGUF's own template (no chat_format)
    gives generate.py's greedy answer on the hf export."""
    llama_cpp = pytest.importorskip("llama_cpp")
    make_adapter(str(smollm2_dir), tmp_path / "adapter", targets=("q_proj", "v_proj"))
    for kind in ("hf", "gguf"):
        result = run_export("--base_model", smollm2_dir, "--lora_weights", tmp_path / "adapter", "--export_dir", tmp_path / "out",
                            "--checkpoint_type", kind, "--dtype", "float32")
        assert result.returncode == 0, result.stderr[-3000:]
    model = llama_cpp.Llama(model_path=str(tmp_path / "out" / "gguf" / "ggml-model-f32.gguf"), n_ctx=512, n_threads=2,
                            verbose=False)
    # The section headers as stop strings, as the Modelfile's PARAMETER stop and generate.py do
    # (an answer ends where the model starts another "### Instruction:").
    stop = Prompter(load_template("alpaca")).section_headers
    for instruction in ["Write a Python function that adds two numbers.", "What does SQL stand for?",
                        "Reverse a string in JavaScript."]:
        reply = model.create_chat_completion([{"role": "user", "content": instruction}], temperature=0.0, top_k=1,
                                             repeat_penalty=1.0, max_tokens=48, seed=0, stop=stop)
        answer = subprocess.run([sys.executable, "generate.py", "--base_model", str(tmp_path / "out" / "hf_ckpt"),
                                 "--instruction", instruction, "--temperature", "0", "--max_new_tokens", "48"],
                                cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert answer.returncode == 0, answer.stderr[-3000:]
        assert reply["choices"][0]["message"]["content"].strip() == answer.stdout.strip()
