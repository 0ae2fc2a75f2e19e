"""The one precision policy (utils/precision.py), with the device queries mocked: no GPU needed."""

import logging
import subprocess

import pytest
import torch

from conftest import ROOT
from utils import precision
from utils.errors import CodeUpError
from utils.model_loading import resolve_dtype


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU of the given compute capability; is_bf16_supported() says True, as torch 2.13
    does on cards that only emulate bf16."""
    def make(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    return make


@pytest.mark.parametrize("capability, expected", [((7, 5), "fp16"), ((7, 0), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_on_a_gpu_uses_bf16_only_where_it_is_native(gpu, capability, expected):
    gpu(capability)
    for stage in ("training", "generation", "evaluation"):
        assert precision.resolve_precision("auto", stage=stage, device="cuda") == expected


@pytest.mark.parametrize("native, training", [(True, "bf16"), (False, "fp32")])
def test_auto_on_a_cpu(monkeypatch, native, training):
    monkeypatch.setattr(precision, "cpu_native_bf16", lambda: native)
    assert precision.resolve_precision("auto", stage="training", device="cpu") == training
    assert precision.resolve_precision("auto", stage="generation", device="cpu") == "fp32"
    assert precision.resolve_precision("auto", stage="evaluation", device="cpu") == "fp32"


def test_8bit_inference_runs_in_fp16_and_export_defaults_to_fp16(gpu):
    gpu((8, 0))
    assert precision.resolve_precision("auto", stage="generation", device="cuda", quantized_8bit=True) == "fp16"
    assert resolve_dtype("auto", "cuda", load_in_8bit=True) is torch.float16
    assert precision.resolve_precision("auto", stage="training", device="cuda", quantized_8bit=True) == "bf16"
    assert precision.resolve_precision("auto", stage="export", device="cpu") == "fp16"


def test_names_and_refusals():
    assert precision.torch_dtype("bfloat16") is torch.bfloat16 and precision.torch_dtype("fp32") is torch.float32
    assert precision.resolve_precision("float16", stage="generation", device="cpu") == "fp16"
    with pytest.raises(CodeUpError, match="fp16 needs a GPU"):
        precision.resolve_precision("fp16", stage="training", device="cpu")
    with pytest.raises(CodeUpError, match="unknown dtype 'fp8'"):
        precision.resolve_precision("fp8", stage="training", device="cpu")


@pytest.mark.parametrize("capability, expected", [((7, 5), False), ((8, 0), True)])
def test_tf32_only_where_the_card_has_it(gpu, capability, expected):
    gpu(capability)
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        assert precision.enable_tf32() is expected
        assert torch.backends.cuda.matmul.allow_tf32 is expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_bitsandbytes_cast_notice_is_silenced_and_other_notices_are_not(caplog):
    precision.silence_bitsandbytes_cast_notice()
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        logger.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", torch.float32)
        logger.warning("something else")
    assert [record.getMessage() for record in caplog.records] == ["something else"]


def test_8bit_training_step_prints_no_cast_notice(tiny_llama_dir, capfd):
    from utils.model_loading import load_model

    model = load_model(str(tiny_llama_dir), load_in_8bit=True, dtype=torch.float32)
    model(input_ids=torch.tensor([[1, 5, 9]])).logits.sum()
    assert "inputs will be cast" not in capfd.readouterr().err


def test_one_policy_and_no_private_torch_api():
    found = subprocess.run(["git", "grep", "-n", "_is_mkldnn_bf16_supported\\|is_bf16_supported()", "--", "*.py",
                            ":!tests/test_precision.py"],
                           cwd=ROOT, capture_output=True, text=True).stdout
    assert found == "", found
