"""Models whose attention or loss is more than Llama's train as transformers computes them: Gemma 2
(soft-capped, sliding-window attention) and Mistral (a window shorter than the examples) keep
transformers' own attention on packed rows, and a mixture of experts keeps its router loss."""

import pytest
import torch
import transformers

import finetune
from utils.train.attention import PER_EXAMPLE_SDPA, per_example_limits

LENGTHS = (7, 5, 9)  # the examples of one packed row; the longest is longer than the windows below


def tiny(model_type: str, **overrides):
    sizes = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                 use_cache=False)  # as finetune.py trains: without a cache, transformers reads packed rows
    return transformers.AutoConfig.for_model(model_type, **{**sizes, **overrides})


def packed_examples():
    generator = torch.Generator().manual_seed(0)
    examples = [torch.randint(3, 64, (length,), generator=generator) for length in LENGTHS]
    features = [{"input_ids": example.tolist(), "labels": example.tolist()} for example in examples]
    return examples, transformers.DataCollatorWithFlattening()(features)


def summed_loss(logits, labels):
    return torch.nn.functional.cross_entropy(logits[:-1].float(), labels[1:], ignore_index=-100, reduction="sum")


def packed_against_alone(config, implementation):
    """Logits and gradients of a packed row through `implementation`, against each example alone
    through transformers' eager attention (the reference implementation)."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    examples, packed = packed_examples()

    def logits_and_grads(compute):
        model.zero_grad()
        logits, loss = compute()
        loss.backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    def alone():
        logits = [model(input_ids=example[None]).logits[0] for example in examples]
        return torch.cat(logits), sum(summed_loss(piece, example) for piece, example in zip(logits, examples))

    reference = logits_and_grads(alone)
    model.set_attn_implementation(implementation)

    def together():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        return logits, summed_loss(logits, packed["labels"][0])

    return logits_and_grads(together), reference


@pytest.mark.parametrize("model_type, overrides, expected, why", [
    ("gemma2", dict(sliding_window=4, query_pre_attn_scalar=8), "eager", "soft-caps the scores (attn_logit_softcapping 50.0)"),
    ("mistral", dict(sliding_window=4), "sdpa", "slides over a window of 4 tokens, within --cutoff_len 16"),
    ("gemma3_text", dict(sliding_window=4), "sdpa", "slides over a window of 4 tokens, within --cutoff_len 16"),
])
def test_packed_rows_keep_the_models_own_attention_and_its_results(model_type, overrides, expected, why):
    config = tiny(model_type, **overrides)
    choice = finetune.choose_attention("auto", packing=True, cuda=False, config=config, cutoff_len=16)
    assert choice == expected
    assert per_example_limits(config, cutoff_len=16) == (expected, f"its attention {why}")  # the speed-ups line says it
    (logits, grads), (reference_logits, reference_grads) = packed_against_alone(config, choice)
    torch.testing.assert_close(logits, reference_logits, rtol=1e-5, atol=1e-5)
    for mine, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model_type", ["mistral", "gemma3_text"])
def test_per_example_attention_would_have_computed_something_else_and_refuses_to(model_type):
    """What the hand-over above avoids: per-example attention forced on a model with a window
    shorter than an example stops at the first packed row, where it would have dropped the window.
    (transformers itself refuses any SDPA kernel for Gemma 2.)"""
    with pytest.raises(ValueError, match="without this model's sliding window, soft-capping or sinks"):
        packed_against_alone(tiny(model_type, sliding_window=4), PER_EXAMPLE_SDPA)


@pytest.mark.parametrize("config, cutoff_len", [
    (tiny("llama"), 16),
    (tiny("mistral", sliding_window=4096), 2048),  # Mistral v0.1's window, longer than any example
    (tiny("qwen2", use_sliding_window=False), 16),
])
def test_models_whose_attention_it_computes_keep_per_example_attention(config, cutoff_len):
    assert per_example_limits(config, cutoff_len=cutoff_len) is None
    assert finetune.choose_attention("auto", packing=True, cuda=False, config=config, cutoff_len=cutoff_len) == PER_EXAMPLE_SDPA


@pytest.mark.parametrize("model_type", ["mixtral", "qwen2_moe"])
def test_a_mixture_of_experts_keeps_its_router_loss(model_type):
    overrides = dict(num_local_experts=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                     shared_expert_intermediate_size=16, output_router_logits=True, router_aux_loss_coef=0.5)
    config = tiny(model_type, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=PER_EXAMPLE_SDPA)
    _, packed = packed_examples()
    trainer = finetune.Trainer(model=model, args=transformers.TrainingArguments(output_dir="/tmp/unused", use_cpu=True,
                                                                                report_to="none"))

    def loss_and_grads(compute):
        model.zero_grad()
        loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    ours = loss_and_grads(lambda: trainer.compute_loss(model, dict(packed)))
    theirs = loss_and_grads(lambda: model(**packed).loss)
    without_router = model(**packed, output_router_logits=False).loss.detach()
    assert not torch.allclose(theirs[0], without_router)  # the router loss is there to lose
    torch.testing.assert_close(ours[0], theirs[0])
    assert len(ours[1]) == len(theirs[1])
    for mine, reference in zip(ours[1], theirs[1]):
        torch.testing.assert_close(mine, reference)
