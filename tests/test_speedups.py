"""The training speed-ups go on and off in one place (utils/train/speedups/): on by default with one
line that names them, all off after the training loop, and none at all with --cpu_speedups False."""

import functools
import types

import pytest
import torch
from transformers.models.llama import modeling_llama

import finetune
from test_finetune import data_file, tiny_flags  # noqa: F401  (fixture)
from utils.train import attention
from utils.train.speedups import dropout, packed_weights, rms_norm, rotary
from utils.model_loading import load_tokenizer
from utils.precision import cpu_native_bf16
from utils.train.speedups import training_speedups


def bf16_lora_model(tiny_llama_dir):
    tokenizer = load_tokenizer(str(tiny_llama_dir), padding_side="right")
    return finetune.build_lora_model(
        base_model=str(tiny_llama_dir), tokenizer=tokenizer, load_in_8bit=False, load_in_4bit=False,
        dtype=torch.bfloat16, lora_r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])


def patched(model) -> dict:
    """What each speed-up leaves on the model's modules while it is on."""
    modules = list(model.modules())
    return {
        "LoRA dropout": sum(isinstance(m, dropout.LoraDropout) for m in modules),
        "LoRA input copies": sum("_cast_input_dtype" in vars(m) for m in modules),
        "RMSNorm": sum(isinstance(vars(m).get("forward"), functools.partial)
                       and vars(m)["forward"].func is rms_norm._rms_norm_forward for m in modules),
        "packed weights": sum(packed_weights.packed_weight_of(m) is not None for m in modules),
        "rotary embeddings": int(modeling_llama.apply_rotary_pos_emb is not ORIGINAL_ROTARY),
    }


ORIGINAL_ROTARY = modeling_llama.apply_rotary_pos_emb


def speedup_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("speed-ups:")]


def test_the_default_puts_each_on_says_so_in_one_line_and_takes_all_off_after(tiny_llama_dir, capsys):
    model = bf16_lora_model(tiny_llama_dir)
    layers = model.config.num_hidden_layers
    trainer = types.SimpleNamespace(model=model, chunked_loss=False)
    before = patched(model)
    assert not any(before.values())  # build_lora_model leaves the model as PEFT made it
    with training_speedups(trainer, cutoff_len=128) as on:
        inside = patched(model)
        assert trainer.chunked_loss is True
    packs = 7 * layers if cpu_native_bf16() else 0  # at least each layer's frozen bf16 linears
    assert inside["LoRA dropout"] == inside["LoRA input copies"] == 2 * layers
    assert inside["RMSNorm"] == 2 * layers + 1 and inside["rotary embeddings"] == 1
    assert inside["packed weights"] >= packs
    said = speedup_lines(capsys)
    assert len(said) == 1 and said[0].startswith(
        f"speed-ups: on: per-example attention, chunked loss, LoRA dropout ({2 * layers}), "
        f"LoRA input copies ({2 * layers}), RMSNorm ({2 * layers + 1}), rotary embeddings (1)")
    assert set(on) >= {"per-example attention", "chunked loss", "LoRA dropout", "RMSNorm", "rotary embeddings"}
    assert patched(model) == before and trainer.chunked_loss is False  # all off again
    assert sum(type(m) is torch.nn.Dropout for m in model.modules()) == 2 * layers


def test_an_error_inside_still_takes_them_all_off(tiny_llama_dir):
    model = bf16_lora_model(tiny_llama_dir)
    trainer = types.SimpleNamespace(model=model, chunked_loss=True)
    with pytest.raises(RuntimeError, match="boom"), training_speedups(trainer):
        raise RuntimeError("boom")
    assert not any(patched(model).values()) and trainer.chunked_loss is True


def test_switched_off_none_goes_on_and_the_line_says_why(tiny_llama_dir, capsys):
    model = bf16_lora_model(tiny_llama_dir)
    trainer = types.SimpleNamespace(model=model, chunked_loss=True)
    with training_speedups(trainer, enabled=False) as on:
        assert not any(patched(model).values()) and trainer.chunked_loss is False
    assert on == {"per-example attention": None}  # chosen when the model loaded: finetune.py asks for sdpa
    assert speedup_lines(capsys)[0].endswith(
        "off: chunked loss (--cpu_speedups False), CPU kernels (--cpu_speedups False)")
    assert finetune.choose_attention("auto", packing=True, cuda=False, speedups=False) == "sdpa"


def test_a_changed_llama_formula_is_named_in_the_line(tiny_llama_dir, monkeypatch, capsys):
    def rotate_half(x):  # another formula, as a new transformers release might have it
        return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)

    monkeypatch.setattr(modeling_llama, "rotate_half", rotate_half)
    model = bf16_lora_model(tiny_llama_dir)
    with training_speedups(types.SimpleNamespace(model=model, chunked_loss=True)) as on:
        assert modeling_llama.apply_rotary_pos_emb is ORIGINAL_ROTARY
    assert "rotary embeddings" not in on and "RMSNorm" in on
    assert "rotary embeddings (transformers " in speedup_lines(capsys)[0].split("off:")[1]


@pytest.mark.slow
@pytest.mark.parametrize("cpu_speedups", [True, False])
def test_training_goes_through_each_speedup_only_when_on(tiny_llama_dir, data_file, tmp_path, monkeypatch, cpu_speedups):
    """Calls through each speed-up during finetune.train: every one is used by default, none with
    --cpu_speedups False."""
    calls = {}

    def count(owner, name, key):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, **k: calls.__setitem__(key, calls.get(key, 0) + 1) or original(*a, **k))

    count(dropout._MaskedScale, "apply", "LoRA dropout")
    count(dropout, "_cast_outside_autocast", "LoRA input copies")
    count(rms_norm.RMSNormFunction, "apply", "RMSNorm")
    count(rotary.RotaryFunction, "apply", "rotary embeddings")
    count(packed_weights, "_times_packed", "packed weights")
    count(finetune, "linear_cross_entropy", "chunked loss")
    count(attention, "causal_attention", "per-example attention")
    flags = tiny_flags(tiny_llama_dir, data_file, tmp_path, precision="bf16", max_steps=2, cpu_speedups=cpu_speedups)
    finetune.train(**flags)
    expected = {"LoRA dropout", "LoRA input copies", "RMSNorm", "rotary embeddings", "chunked loss",
                "per-example attention"} | ({"packed weights"} if cpu_native_bf16() else set())
    assert set(calls) == (expected if cpu_speedups else set()), calls
