"""The chunked training loss (utils/train/loss.py) computes transformers' loss and its gradients exactly."""

import pytest
import torch
import transformers

from conftest import build_tiny_llama  # noqa: F401  (the fixture module)
import finetune
from test_finetune import data_file, lora_model, tokenize  # noqa: F401  (fixture)
from utils.train import loss as chunked
from utils.model_loading import load_tokenizer


def reference_loss(hidden, weight, labels, num_items_in_batch=None):
    """transformers' ForCausalLMLoss over the full logits."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    return ForCausalLMLoss(hidden @ weight.T, labels, vocab_size=weight.shape[0], num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("weight_trainable", [False, True])
def test_same_loss_and_gradients_as_full_logits(monkeypatch, dtype, tolerance, weight_trainable):
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, "cpu", 16 * 50)  # chunks of 16 tokens: two, the last one short
    torch.manual_seed(0)
    hidden = torch.randn(2, 13, 16, dtype=dtype, requires_grad=True)  # 26 tokens, 21 with a label
    weight = torch.randn(50, 16, dtype=dtype, requires_grad=weight_trainable)
    labels = torch.randint(0, 50, (2, 13))
    labels[0, :4] = -100  # a prompt that is not learned
    labels[1, 6] = -100  # an example boundary in a packed row
    for num_items in (None, torch.tensor(40)):
        ours = chunked.linear_cross_entropy(hidden, weight, labels, num_items_in_batch=num_items)
        theirs = reference_loss(hidden, weight, labels, num_items)
        assert torch.allclose(ours, theirs.float(), rtol=tolerance, atol=tolerance)
        ours_grads = torch.autograd.grad(3 * ours, [hidden, weight] if weight_trainable else [hidden])
        theirs_grads = torch.autograd.grad(3 * theirs, [hidden, weight] if weight_trainable else [hidden])
        for mine, reference in zip(ours_grads, theirs_grads):
            assert mine.dtype == reference.dtype
            assert torch.allclose(mine.float(), reference.float(), rtol=tolerance, atol=tolerance * reference.abs().max().item())


def test_no_logits_for_tokens_without_a_label(monkeypatch):
    seen = []
    real = chunked.LinearCrossEntropy.apply
    monkeypatch.setattr(chunked.LinearCrossEntropy, "apply", lambda hidden, *rest: seen.append(hidden.shape[0]) or real(hidden, *rest))
    labels = torch.full((1, 10), -100)
    labels[0, 6:] = 1
    chunked.linear_cross_entropy(torch.randn(1, 10, 8), torch.randn(5, 8), labels)
    assert seen == [4]  # the labels at 6..9 are predicted from positions 5..8 (of 10)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_trainer_loss_and_lora_gradients_equal_transformers(tiny_llama_dir, data_file, precision):
    """finetune's Trainer on a packed micro-batch, against the model's own loss; bf16 as the
    Trainer runs it: a bf16 base, float32 LoRA weights, under autocast."""
    import contextlib

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    batch = transformers.DataCollatorWithFlattening()(list(train)[:4])
    bf16 = precision == "bf16"
    model = lora_model(tiny_llama_dir, tokenizer, dtype=torch.bfloat16 if bf16 else torch.float32)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    loss_tolerance, grad_tolerance = (1e-2, 2e-2) if bf16 else (1e-5, 1e-4)
    args = transformers.TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to="none")
    trainer = finetune.Trainer(model=model, args=args)
    assert chunked.head_of(model) is model.get_base_model().lm_head
    num_items = (batch["labels"][:, 1:] != -100).sum()

    def loss_and_grads(compute):
        model.zero_grad()
        with autocast():
            loss = compute()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    ours = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items))
    theirs = loss_and_grads(lambda: model(**batch, num_items_in_batch=num_items).loss)
    assert torch.allclose(ours[0].float(), theirs[0].float(), rtol=loss_tolerance)
    assert len(ours[1]) == 8  # LoRA A and B of q and v in 2 layers
    for mine, reference in zip(ours[1], theirs[1]):
        assert mine.dtype == reference.dtype == torch.float32
        assert torch.allclose(mine, reference, rtol=grad_tolerance, atol=grad_tolerance * reference.abs().max().item())
    # the head is the model's own again afterwards: logits, not hidden states
    assert model(**batch).logits.shape[-1] == model.config.vocab_size


def test_heads_with_more_than_a_matmul_keep_transformers_loss():
    config = transformers.Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    assert config.final_logit_softcapping  # Gemma 2 soft-caps its logits
    assert chunked.head_of(transformers.AutoModelForCausalLM.from_config(config)) is None


def test_trainer_runs_the_head_in_the_mixed_precision_of_the_forward(tiny_llama_dir, data_file, monkeypatch):
    """A quantized base keeps its head in float32 (PEFT upcasts it); the Trainer autocasts only the
    model's forward. The chunked head must still run in bf16, as the model's own head would."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    batch = transformers.DataCollatorWithFlattening()(list(train)[:4])
    model = lora_model(tiny_llama_dir, tokenizer, dtype=torch.float32)
    assert model.get_base_model().lm_head.weight.dtype == torch.float32
    args = transformers.TrainingArguments(output_dir="/tmp/unused", use_cpu=True, bf16=True, report_to="none")
    trainer = finetune.Trainer(model=model, args=args)
    seen = []
    apply = chunked.LinearCrossEntropy.apply
    monkeypatch.setattr(chunked.LinearCrossEntropy, "apply",
                        lambda hidden, weight, *rest: seen.append((hidden.dtype, weight.dtype)) or apply(hidden, weight, *rest))
    forward = model.forward  # what the Trainer's accelerate does: autocast around the forward only
    model.forward = lambda *a, **k: torch.autocast("cpu", dtype=torch.bfloat16)(forward)(*a, **k)
    loss = trainer.compute_loss(model, dict(batch))
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    theirs = model(**batch).loss
    assert torch.allclose(loss.float(), theirs.float(), rtol=1e-2)
