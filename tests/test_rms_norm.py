"""The hand-written RMSNorm (utils/train/speedups/rms_norm.py) computes what each transformers class it replaces
computes, and only where it applies."""

import importlib

import pytest
import torch

from utils.train.speedups import source_code
from utils.train.speedups.rms_norm import RMSNormFunction, is_llama_rms_norm, use_fast_rms_norm

UNTESTED = source_code.untested_code({"LlamaRMSNorm.forward": source_code.llama_references()["LlamaRMSNorm.forward"]})
# Where the installed LlamaRMSNorm is not the code the kernel was tested against, it stays off
# (tests/test_dependencies.py checks that, and that the pinned transformers is tested).
needs_the_kernel = pytest.mark.skipif(UNTESTED is not None, reason=f"the kernel is off: {UNTESTED}")

# Classes whose forward is LlamaRMSNorm's, word for word (the models this project names, and some
# that no list here ever named), and classes whose formula differs.
LLAMA_FORMULA = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "MixtralRMSNorm": "mixtral",
                 "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3", "Qwen2MoeRMSNorm": "qwen2_moe",
                 "Qwen3MoeRMSNorm": "qwen3_moe", "Phi3RMSNorm": "phi3", "GraniteRMSNorm": "granite",
                 "DeepseekV3RMSNorm": "deepseek_v3", "SmolLM3RMSNorm": "smollm3"}
OTHER_FORMULA = {"GemmaRMSNorm": "gemma", "Gemma3RMSNorm": "gemma3", "Olmo2RMSNorm": "olmo2"}


def transformers_norm(class_name: str, size: int):
    model_type = {**LLAMA_FORMULA, **OTHER_FORMULA}[class_name]
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    norm = getattr(module, class_name)(size, eps=1e-5).bfloat16().requires_grad_(False)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    return norm


@needs_the_kernel
@pytest.mark.parametrize("class_name", sorted(LLAMA_FORMULA))
def test_same_output_and_input_gradient_as_the_class(class_name):
    torch.manual_seed(0)
    norm = transformers_norm(class_name, 96)
    x = (3 * torch.randn(2, 33, 96)).bfloat16().requires_grad_(True)
    grad_output = torch.randn(2, 33, 96, dtype=torch.bfloat16)
    theirs = norm(x)
    (their_grad,) = torch.autograd.grad(theirs, x, grad_output)
    assert use_fast_rms_norm(norm) == 1
    ours = norm(x)
    (our_grad,) = torch.autograd.grad(ours, x, grad_output)
    assert ours.grad_fn.name().startswith(RMSNormFunction.__name__)  # this path, not the class's
    assert torch.equal(ours, theirs)
    torch.testing.assert_close(our_grad, their_grad, rtol=1e-2, atol=1e-2 * their_grad.abs().max().item())


@pytest.mark.parametrize("case", ["float32", "trained weight", *sorted(OTHER_FORMULA)])
def test_elsewhere_the_class_forward_runs(case):
    norm = transformers_norm(case if case in OTHER_FORMULA else "LlamaRMSNorm", 16)
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    if case == "float32":
        norm, x = norm.float(), x.detach().float().requires_grad_(True)
    elif case == "trained weight":
        norm.weight.requires_grad_(True)
    else:
        assert not is_llama_rms_norm(norm) and use_fast_rms_norm(norm) == 0  # another formula: left alone
    expected = norm(x)
    use_fast_rms_norm(norm)
    output = norm(x)
    assert RMSNormFunction.__name__ not in output.grad_fn.name()
    assert torch.equal(output, expected)


def test_finetune_puts_it_on_every_norm_while_it_trains(tiny_llama_dir):
    import types

    import finetune
    from utils.model_loading import load_tokenizer
    from utils.train.speedups import training_speedups

    tokenizer = load_tokenizer(str(tiny_llama_dir), padding_side="right")
    model = finetune.build_lora_model(
        base_model=str(tiny_llama_dir), tokenizer=tokenizer, load_in_8bit=False, load_in_4bit=False,
        dtype=torch.bfloat16, lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    norms = [module for module in model.modules() if type(module).__name__ == "LlamaRMSNorm"]
    assert len(norms) == 2 * model.config.num_hidden_layers + 1
    x = torch.randn(2, 5, model.config.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    with training_speedups(types.SimpleNamespace(model=model, chunked_loss=True)):
        assert all(RMSNormFunction.__name__ in norm(x).grad_fn.name() for norm in norms)
    assert not any(RMSNormFunction.__name__ in norm(x).grad_fn.name() for norm in norms)  # the class's again


def test_a_changed_llama_formula_keeps_every_norm_on_its_own_forward(monkeypatch):
    """A transformers release that changes LlamaRMSNorm: Mistral's copy still reads as the old code,
    but the kernel computes the old formula, so no norm gets it (utils/train/speedups/'s line says why)."""
    from utils.train.speedups.rms_norm import untested_rms_norm

    from transformers.models.llama import modeling_llama

    def forward(self, hidden_states):  # another formula (no float32 upcast), as a new release might have it
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)
    mistral = transformers_norm("MistralRMSNorm", 16)
    assert use_fast_rms_norm(mistral) == 0 and "forward" not in vars(mistral)
    assert untested_rms_norm() == (f"transformers {transformers_version()}'s Llama LlamaRMSNorm.forward is not the "
                                   "code it was tested against (utils/train/speedups/source_code.py, TESTED_CODE)")


def transformers_version() -> str:
    import transformers

    return transformers.__version__
