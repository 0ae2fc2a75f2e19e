"""Every adapter PEFT writes for these models merges exactly, or is refused in one line naming the
tensor: never a silently different model."""

import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from conftest import build_tiny_llama
from test_export import run_export

PROBE_IDS = [[1, 5, 17, 42, 99, 7, 250, 3, 64, 128]]


@pytest.fixture(scope="module")
def untied_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("untied"), seed=2)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, seed=3)


@pytest.fixture(scope="module")
def biased_dir(tmp_path_factory):
    """A Llama with biases on q/k/v/o (as Qwen2 has on q/k/v): what lora_bias=True needs."""
    folder = build_tiny_llama(tmp_path_factory.mktemp("biased"), seed=4)
    model = LlamaForCausalLM.from_pretrained(folder)
    model.config.attention_bias = True
    torch.manual_seed(4)
    biased = LlamaForCausalLM(model.config)
    biased.load_state_dict(model.state_dict(), strict=False)
    biased.save_pretrained(folder)
    return folder


def perturbed_adapter(base, folder, *, resize_to=None, tokens=None, **lora_options):
    """A PEFT model over `base` whose every trainable tensor is random (a fresh adapter's B is zero
    and its module copies equal the base: they would prove nothing), saved to `folder`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if tokens:
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        tokenizer.add_tokens(tokens)
        model.resize_token_embeddings(len(tokenizer))
    elif resize_to:
        model.resize_token_embeddings(resize_to)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, **lora_options))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)
    peft_model.save_pretrained(folder)
    if tokens:
        tokenizer.save_pretrained(folder)
    return peft_model.eval()


def logits(model):
    with torch.no_grad():
        return model(torch.tensor(PROBE_IDS)).logits


def assert_export_equals(peft_model, base, adapter, tmp_path):
    result = run_export("--base_model", base, "--lora_weights", adapter, "--export_dir", tmp_path / "out", "--dtype", "float32")
    assert result.returncode == 0, result.stderr[-3000:]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out" / "hf_ckpt"), dtype=torch.float32)
    assert (logits(merged) - logits(peft_model)).abs().max().item() <= 1e-4
    return merged


def assert_refused(base, adapter, tmp_path, *words):
    result = run_export("--base_model", base, "--lora_weights", adapter, "--export_dir", tmp_path / "out")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(word in line for word in words), line
    assert not (tmp_path / "out" / "hf_ckpt").exists()


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.slow  # 14 exports
@pytest.mark.parametrize("base_name", ["untied_dir", "tied_dir"])
@pytest.mark.parametrize("kind, options", [
    ("plain", dict(target_modules=ALL_LINEAR)),
    ("rslora", dict(target_modules=ALL_LINEAR, use_rslora=True)),
    ("patterns", dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 8},
                      alpha_pattern={"down_proj": 3, "layers.0.self_attn.q_proj": 32})),
    ("dora", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True)),
    ("lm_head copy", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    ("embed copy", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
    ("embedding LoRA", dict(target_modules=["q_proj", "embed_tokens"])),
])
def test_adapter_kind_merges_exactly(request, base_name, kind, options, tmp_path):
    base = request.getfixturevalue(base_name)
    peft_model = perturbed_adapter(base, tmp_path / "adapter", **options)
    assert_export_equals(peft_model, base, tmp_path / "adapter", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("base_name", ["untied_dir", "tied_dir"])
def test_resized_embeddings_merge_with_the_bigger_vocabulary(request, base_name, tmp_path):
    base = request.getfixturevalue(base_name)
    peft_model = perturbed_adapter(base, tmp_path / "adapter", resize_to=404, target_modules=["q_proj"])
    merged = assert_export_equals(peft_model, base, tmp_path / "adapter", tmp_path)
    assert merged.config.vocab_size == 404


def test_added_tokens_with_embedding_and_head_copies(untied_dir, tmp_path):
    peft_model = perturbed_adapter(untied_dir, tmp_path / "adapter", tokens=["<tool>", "</tool>"], target_modules=["q_proj"],
                                   modules_to_save=["embed_tokens", "lm_head"])
    assert_export_equals(peft_model, untied_dir, tmp_path / "adapter", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "out" / "hf_ckpt"))
    assert tokenizer.convert_tokens_to_ids("</tool>") == peft_model.get_input_embeddings().weight.shape[0] - 1


def test_lora_bias_merges_into_the_base_bias(biased_dir, tmp_path):
    peft_model = perturbed_adapter(biased_dir, tmp_path / "adapter", target_modules=["q_proj", "v_proj"], lora_bias=True)
    assert_export_equals(peft_model, biased_dir, tmp_path / "adapter", tmp_path)


def test_lora_bias_without_a_base_bias_is_refused(untied_dir, tmp_path):
    perturbed_adapter(untied_dir, tmp_path / "adapter", target_modules=["q_proj"], lora_bias=True)
    assert_refused(untied_dir, tmp_path / "adapter", tmp_path, "model.layers.0.self_attn.q_proj.lora_B.bias", "no", "bias")


def test_trainable_tokens_are_refused(untied_dir, tmp_path):
    perturbed_adapter(untied_dir, tmp_path / "adapter", target_modules=["q_proj"], trainable_token_indices=[3, 4])
    assert_refused(untied_dir, tmp_path / "adapter", tmp_path, "trainable_token_indices")


def test_an_unknown_tensor_is_refused_by_name(untied_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    perturbed_adapter(untied_dir, tmp_path / "adapter", target_modules=["q_proj"])
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    weights["base_model.model.model.layers.0.self_attn.q_proj.lora_mystery"] = torch.zeros(3)
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert_refused(untied_dir, tmp_path / "adapter", tmp_path, "base_model.model.model.layers.0.self_attn.q_proj.lora_mystery")
    shutil.rmtree(tmp_path / "adapter")
