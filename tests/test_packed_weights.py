"""Frozen bf16 matmuls through oneDNN-packed weights (utils/train/speedups/packed_weights.py) compute what the
plain ones do, only where they apply, and leave the model as it was."""

import pytest
import torch
import transformers

import finetune
from conftest import build_tiny_llama  # noqa: F401  (the fixture module)
from test_finetune import data_file, tiny_flags  # noqa: F401  (fixture)
from utils.train import loss as chunked
from utils.train.speedups import packed_weights
from utils.train.speedups.packed_weights import packed_frozen_linears, packed_weight_of

pytestmark = pytest.mark.skipif(not packed_weights.packing_supported(torch.empty(1, 1, dtype=torch.bfloat16)),
                                reason="this CPU's oneDNN has no bf16")


def frozen(module):
    return module.requires_grad_(False)


@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_computes_the_same_output_and_input_gradient(bias):
    torch.manual_seed(0)
    layer = frozen(torch.nn.Linear(96, 160, bias=bias)).bfloat16()
    x = torch.randn(2, 37, 96, dtype=torch.bfloat16, requires_grad=True)
    grad_output = torch.randn(2, 37, 160, dtype=torch.bfloat16)
    plain = layer(x)
    (plain_grad,) = torch.autograd.grad(plain, x, grad_output)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_plain = layer(x.detach().float())  # as PEFT and float32 norms may pass it under autocast
    with packed_frozen_linears(layer) as swapped:
        assert swapped == 1 and packed_weight_of(layer) is not None
        packed = layer(x)
        (packed_grad,) = torch.autograd.grad(packed, x, grad_output)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast_packed = layer(x.detach().float())
    assert packed.dtype == packed_grad.dtype == autocast_packed.dtype == torch.bfloat16
    assert torch.equal(packed, plain)  # the same kernel, the bias added inside it as F.linear does
    assert torch.equal(autocast_packed, autocast_plain)
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-2, atol=1e-2)


def test_an_error_inside_leaves_the_modules_as_they_were():
    layer = frozen(torch.nn.Linear(8, 8)).bfloat16()
    with pytest.raises(RuntimeError, match="training failed"):
        with packed_frozen_linears(layer):
            raise RuntimeError("training failed")
    assert packed_weight_of(layer) is None and "forward" not in vars(layer)


def test_a_weight_unfrozen_inside_gets_its_gradient():
    layer = frozen(torch.nn.Linear(8, 8, bias=False)).bfloat16()
    with packed_frozen_linears(layer):
        layer.weight.requires_grad_(True)
        layer(torch.randn(3, 8, dtype=torch.bfloat16)).sum().backward()
    assert layer.weight.grad is not None


def test_nothing_is_packed_where_memory_is_short(monkeypatch, caplog):
    layer = frozen(torch.nn.Linear(64, 64, bias=False)).bfloat16()  # 8 KB of weight
    monkeypatch.setattr(packed_weights.psutil, "virtual_memory", lambda: type("Memory", (), {"available": 12_000})())
    with caplog.at_level("WARNING"), packed_frozen_linears(layer) as swapped:
        assert swapped == 0 and packed_weight_of(layer) is None
    assert "Not packing the frozen weights" in caplog.text


def test_only_frozen_bf16_linears_are_packed_and_all_are_restored():
    model = torch.nn.ModuleDict({
        "frozen": frozen(torch.nn.Linear(8, 8, bias=False)).bfloat16(),
        "frozen_with_bias": frozen(torch.nn.Linear(8, 8)).bfloat16(),
        "trainable": torch.nn.Linear(8, 8).bfloat16(),  # a LoRA matrix, or an unfrozen layer
        "float32": frozen(torch.nn.Linear(8, 8)),
        "trainable_bias": frozen(torch.nn.Linear(8, 8)).bfloat16().requires_grad_(False),
        "head": frozen(torch.nn.Linear(8, 16, bias=False)).bfloat16(),
    })
    model["trainable_bias"].bias.requires_grad_(True)
    with packed_frozen_linears(model, head=model["head"]) as swapped:
        packed = {name for name, module in model.items() if packed_weight_of(module) is not None}
        assert packed == {"frozen", "frozen_with_bias", "head"} and swapped == 3
        assert packed_weight_of(model["head"]).backward_pack is not None  # the head's input gradient too
        assert packed_weight_of(model["frozen"]).backward_pack is None
    assert all(packed_weight_of(module) is None and "forward" not in vars(module) for module in model.values())


def test_the_loss_with_a_packed_head_is_the_same(monkeypatch):
    monkeypatch.setitem(chunked.CHUNK_ELEMENTS, "cpu", 16 * 50)  # several chunks
    torch.manual_seed(0)
    head = frozen(torch.nn.Linear(32, 50, bias=False)).bfloat16()
    hidden = torch.randn(1, 40, 32, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 50, (1, 40))
    plain = chunked.linear_cross_entropy(hidden, head.weight, labels)
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    with packed_frozen_linears(head, head=head):
        with chunked.head_skipped(head):  # as the Trainer calls it: the packed forward comes back after
            assert torch.equal(head(hidden), hidden)
        assert packed_weight_of(head) is not None and "forward" in vars(head)
        packed = chunked.linear_cross_entropy(hidden, head.weight, labels, packed=packed_weight_of(head))
        (packed_grad,) = torch.autograd.grad(packed, hidden)
    assert torch.equal(packed, plain)
    torch.testing.assert_close(packed_grad, plain_grad, rtol=1e-2, atol=1e-2 * plain_grad.abs().max().item())


class CountsPacks(transformers.TrainerCallback):
    """The number of packed modules of the model at each training step."""

    def __init__(self):
        self.counts = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.counts.append(sum(packed_weight_of(module) is not None for module in model.modules()))


@pytest.mark.slow
def test_training_in_bf16_packs_the_frozen_weights_and_learns_the_same(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    flags = dict(precision="bf16", max_steps=2)
    seen = CountsPacks()
    packed = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "packed", callbacks=[seen], **flags))
    assert len(seen.counts) == 2 and min(seen.counts) > 0
    assert not any(packed_weight_of(module) for module in packed.model.modules())  # released after training
    monkeypatch.setattr(packed_weights, "packing_supported", lambda weight: False)
    unpacked = CountsPacks()
    plain = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "plain", callbacks=[unpacked], **flags))
    assert unpacked.counts == [0, 0]
    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses(packed)) == 2
    assert losses(packed) == pytest.approx(losses(plain), abs=1e-2)
