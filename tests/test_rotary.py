"""The hand-written rotary embedding (utils/train/speedups/rotary.py) computes the same bits as transformers', forward
and backward, and is swapped in only where the formula is Llama's, only inside its block."""

import importlib

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

from utils.train.speedups.rotary import RotaryFunction, fast_rotary_embeddings, llama_rotary_modules, untested_rotary

# Where the installed Llama rotary functions are not the code the kernel was tested against, it
# stays off (tests/test_dependencies.py checks that, and that the pinned transformers is tested).
needs_the_kernel = pytest.mark.skipif(untested_rotary() is not None, reason=f"the kernel is off: {untested_rotary()}")

A_LLAMA_MODULE = modeling_llama.LlamaRMSNorm(8)  # any module of modeling_llama: the function is swapped there


def rotary_inputs(dtype, *, layout):
    torch.manual_seed(0)
    heads_first = layout == "heads first"  # (batch, heads, tokens, head_dim), transformers' usual
    q = torch.randn(2, 6, 37, 16) if heads_first else torch.randn(2, 37, 6, 16)
    k = torch.randn(2, 2, 37, 16) if heads_first else torch.randn(2, 37, 2, 16)
    angles = torch.randn(2, 37, 16)
    return (q.to(dtype).requires_grad_(), k.to(dtype).requires_grad_(), angles.cos().to(dtype), angles.sin().to(dtype),
            1 if heads_first else 2)


@needs_the_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["heads first", "tokens first"])
def test_same_bits_forward_and_backward_as_transformers(dtype, layout):
    q, k, cos, sin, unsqueeze_dim = rotary_inputs(dtype, layout=layout)
    grads = torch.randn_like(q), torch.randn_like(k)
    theirs = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    their_grads = torch.autograd.grad(theirs, (q, k), grads)
    with fast_rotary_embeddings(A_LLAMA_MODULE) as changed:
        assert changed == 1
        ours = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    our_grads = torch.autograd.grad(ours, (q, k), grads)
    assert all("RotaryFunction" in t.grad_fn.name() for t in ours)  # this path, not transformers'
    for mine, reference in zip((*ours, *our_grads), (*theirs, *their_grads)):
        assert torch.equal(mine, reference)


@needs_the_kernel
def test_a_model_trains_to_the_same_bits_and_the_module_is_restored(tiny_llama_dir, monkeypatch):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def loss_and_grads():
        model.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters()]

    original = modeling_llama.apply_rotary_pos_emb
    expected_loss, expected_grads = loss_and_grads()
    calls = []
    monkeypatch.setattr(RotaryFunction, "apply", lambda *args, apply=RotaryFunction.apply: calls.append(1) or apply(*args))
    with fast_rotary_embeddings(model) as changed:
        assert changed == 1 and modeling_llama.apply_rotary_pos_emb is not original
        loss, grads = loss_and_grads()
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k of every layer went through it
    assert modeling_llama.apply_rotary_pos_emb is original
    assert torch.equal(loss, expected_loss)
    assert all(torch.equal(mine, reference) for mine, reference in zip(grads, expected_grads))
    with pytest.raises(RuntimeError, match="boom"), fast_rotary_embeddings(model):
        raise RuntimeError("boom")
    assert modeling_llama.apply_rotary_pos_emb is original


@needs_the_kernel
@pytest.mark.parametrize("model_type, llama_formula", [("qwen2", True), ("mistral", True), ("phi3", False),
                                                       ("olmo2", False)])
def test_only_modules_with_llamas_formula_are_changed(model_type, llama_formula):
    config = transformers.AutoConfig.for_model(model_type, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = transformers.AutoModelForCausalLM.from_config(config)
    modeling = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    assert llama_rotary_modules(model) == ([modeling] if llama_formula else [])


@needs_the_kernel
def test_a_constant_that_needs_a_gradient_keeps_transformers_path():
    q, k, cos, sin, unsqueeze_dim = rotary_inputs(torch.float32, layout="heads first")
    cos.requires_grad_()
    with fast_rotary_embeddings(A_LLAMA_MODULE):
        rotated, _ = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    (grad_cos,) = torch.autograd.grad(rotated.sum(), cos)
    assert "RotaryFunction" not in rotated.grad_fn.name() and grad_cos.abs().sum() > 0


@needs_the_kernel
def test_mixed_dtypes_keep_transformers_path_and_its_bits():
    q, k, cos, sin, unsqueeze_dim = rotary_inputs(torch.bfloat16, layout="heads first")
    cos, sin = cos.float(), sin.float()  # bf16 q against float32 constants: transformers rounds differently
    grads = torch.randn(q.shape), torch.randn(k.shape)
    theirs = torch.autograd.grad(modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim), (q, k), grads)
    with fast_rotary_embeddings(A_LLAMA_MODULE):
        rotated = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)
    assert "RotaryFunction" not in rotated[0].grad_fn.name()
    assert all(torch.equal(mine, reference) for mine, reference in zip(torch.autograd.grad(rotated, (q, k), grads), theirs))


def test_a_changed_llama_formula_keeps_every_model_on_its_own_rotary(monkeypatch):
    """A transformers release that changes Llama's rotate_half: Qwen2's copy still reads as the old
    code, but the kernel computes the old formula, so no module is swapped (utils/train/speedups/'s line
    says why)."""
    def rotate_half(x):  # another formula (interleaved pairs), as a new release might have it
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    monkeypatch.setattr(modeling_llama, "rotate_half", rotate_half)
    config = transformers.AutoConfig.for_model("qwen2", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    model = transformers.AutoModelForCausalLM.from_config(config)
    modeling_qwen2 = importlib.import_module("transformers.models.qwen2.modeling_qwen2")
    original = modeling_qwen2.apply_rotary_pos_emb
    with fast_rotary_embeddings(model) as changed:
        assert changed == 0 and modeling_qwen2.apply_rotary_pos_emb is original
    assert untested_rotary() == (f"transformers {transformers.__version__}'s Llama rotate_half is not the code it was "
                                 "tested against (utils/train/speedups/source_code.py, TESTED_CODE)")


def test_hub_kernel_wrappers_are_read_through():
    """With the `kernels` package, transformers 5.25 wraps apply_rotary_pos_emb in an nn.Module; the
    source compared is the function it calls."""
    from utils.train.speedups.source_code import code_of, unwrapped

    def formula(q, k):
        return q + k

    def make_wrapper(func):  # the shape of kernels' wrapper: forward calls the function it closes over
        class Func(torch.nn.Module):
            def forward(self, *args):
                return func(*args)
        return Func()

    class Plain(torch.nn.Module):  # calls the function by its global name: a module of its own
        def forward(self, *args):
            return formula(*args)

    wrapper = make_wrapper(formula)
    assert unwrapped(wrapper) is formula and code_of(wrapper) == code_of(formula) and wrapper(1, 2) == 3
    assert unwrapped(Plain()) is not formula and code_of(Plain()) is None
