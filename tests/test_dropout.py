"""LoRA dropout (utils/train/speedups/dropout.py): the same dropout as nn.Dropout, and what finetune.py installs."""

import pytest
import torch

import finetune
from utils.train.speedups.dropout import LoraDropout, keep_factors, skip_lora_input_copies, use_fast_lora_dropout
from utils.model_loading import load_tokenizer


def test_keeps_one_minus_p_of_the_elements_and_scales_them_as_nn_dropout_does():
    torch.manual_seed(0)
    x = torch.randn(400, 500)
    dropout = LoraDropout(0.05).train()
    out = dropout(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(0.95, abs=0.002)  # 200k elements: 4 standard errors
    assert dropout.drawn_p == 1638 / 32768  # p rounded to the 15-bit draws
    # Kept float32 elements (PEFT's LoRA input): nn.Dropout's factor for that p, to the last bit
    # (its mask is bernoulli(1 - p) / (1 - p) in float32).
    factor = torch.ones(()).div_(1 - dropout.drawn_p)
    assert torch.equal(out[kept], x[kept] * factor)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_a_half_precision_input_gets_the_exact_factor_rounded_once(dtype, p):
    torch.manual_seed(0)
    x = torch.randn(400, 500, dtype=dtype)
    dropout = LoraDropout(p).train()
    out = dropout(x)
    kept = out != 0
    assert kept.float().mean().item() == pytest.approx(1 - p, abs=0.005)  # 200k elements: > 4 standard errors
    expected = (x.float() * (1 / (1 - dropout.drawn_p))).to(dtype)
    assert out.dtype == dtype and torch.equal(out[kept], expected[kept])


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 32, requires_grad=True)
    out = LoraDropout(0.5).train()(x)
    out.sum().backward()
    assert torch.equal(x.grad, (out != 0).float() * 2.0)


def test_seeded_masks_repeat_and_eval_is_the_identity():
    x = torch.randn(32, 32)
    dropout = LoraDropout(0.3).train()
    torch.manual_seed(7)
    first = dropout(x)
    torch.manual_seed(7)
    assert torch.equal(dropout(x), first)
    assert not torch.equal(dropout(x), first)  # the generator moved on
    assert dropout.eval()(x) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 0.99999])  # the last rounds to 1 in 1/32768ths
def test_impossible_probability_is_refused(p):
    with pytest.raises(ValueError, match="dropout probability"):
        LoraDropout(p)


@pytest.mark.parametrize("threshold", [0, 1, 1638, 16384, 32767])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_every_16_bit_draw_drops_exactly_threshold_in_32768(threshold, dtype):
    every_draw = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    factors = keep_factors(every_draw, threshold=threshold, dtype=dtype)
    assert factors.dtype == dtype and set(factors.unique().tolist()) <= {0.0, 1.0}
    assert int((factors == 0).sum()) == 2 * threshold  # each 15-bit value twice among 65536 draws


def test_a_probability_that_rounds_to_zero_is_the_identity():
    dropout = LoraDropout(1e-6).train()
    x = torch.randn(8, 8)
    assert dropout.drawn_p == 0 and dropout(x) is x


@pytest.mark.parametrize("lora_dropout, kind", [(0.1, LoraDropout), (0.0, torch.nn.Identity)])
def test_finetune_puts_it_on_every_lora_layer_while_it_trains(tiny_llama_dir, lora_dropout, kind):
    import types

    from utils.train.speedups import training_speedups

    tokenizer = load_tokenizer(str(tiny_llama_dir), padding_side="right")
    model = finetune.build_lora_model(
        base_model=str(tiny_llama_dir), tokenizer=tokenizer, load_in_8bit=False, load_in_4bit=False,
        dtype=torch.bfloat16, lora_r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=["q_proj", "v_proj"])
    layers = [module for module in model.modules() if hasattr(module, "lora_dropout")]
    assert len(layers) == 2 * model.config.num_hidden_layers
    with training_speedups(types.SimpleNamespace(model=model, chunked_loss=True)):
        for layer in layers:
            assert type(layer.lora_dropout["default"]) is kind
    for layer in layers:  # PEFT's own again after training
        assert type(layer.lora_dropout["default"]) is (torch.nn.Dropout if lora_dropout else torch.nn.Identity)


def test_use_fast_lora_dropout_counts_what_it_changed():
    from peft import LoraConfig, get_peft_model

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    model = get_peft_model(model, LoraConfig(r=2, lora_dropout=0.2, target_modules=["0", "2"]))
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.modules()) == 2
    model.eval()
    assert use_fast_lora_dropout(model) == 2
    assert not any(isinstance(m, torch.nn.Dropout) for m in model.modules())
    swapped = [m for m in model.modules() if isinstance(m, LoraDropout)]
    assert len(swapped) == 2 and not any(m.training for m in swapped)  # the mode it found


def test_lora_inputs_stay_in_autocasts_dtype_and_compute_the_same():
    """Under autocast a LoRA layer's input is no longer copied to float32 (and cast straight back
    by the LoRA matmul); outside autocast it still is (float32 adapters on a bf16 base need it)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False)).bfloat16()
    model = get_peft_model(base, LoraConfig(r=4, lora_dropout=0.1, target_modules=["0"]))  # adapters in float32
    use_fast_lora_dropout(model)
    torch.nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)  # B starts at 0: no LoRA output
    model.train()
    x = torch.randn(3, 10, 64, dtype=torch.bfloat16)
    seen = []
    model.base_model.model[0].lora_dropout["default"].register_forward_hook(lambda m, args, out: seen.append(args[0].dtype))

    lora_weights = [p for p in model.parameters() if p.requires_grad]

    def run():
        torch.manual_seed(1)  # the same dropout mask
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(inputs)
        grads = torch.autograd.grad(output.float().square().sum(), [inputs, *lora_weights])
        return output, grads

    before, before_grads = run()
    assert skip_lora_input_copies(model) == 1
    assert skip_lora_input_copies(model) == 0  # once per layer
    after, after_grads = run()
    assert seen == [torch.float32, torch.bfloat16]
    assert torch.equal(before, after)  # dropout and the LoRA matmuls give the same bits
    for mine, reference in zip(after_grads, before_grads):  # the input's and the LoRA weights' gradients
        assert mine.dtype == reference.dtype
        torch.testing.assert_close(mine, reference, rtol=1e-2, atol=1e-2 * reference.abs().max().item())
    model.eval()
    assert model(x).dtype == torch.bfloat16 and seen[-1] == torch.float32  # outside autocast: cast as PEFT does
