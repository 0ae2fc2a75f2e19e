"""The training stage on the tiny random Llama (fast) and on SmolLM2-135M with real records."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SHARED_DATA

import finetune  # noqa: E402
from utils.errors import CodeUpError
from utils.model_loading import load_tokenizer
from utils.tokenization import IGNORE_INDEX

RECORDS = [
    {"instruction": f"Write a Python function that returns {n} times its argument.", "input": "",
     "output": f"def times_{n}(x):\n    return {n} * x"}
    for n in range(24)
] + [
    {"instruction": "Sort the list.", "input": f"[{n}, 3, 1]", "output": f"sorted([{n}, 3, 1])"} for n in range(8)
]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "records.json"
    path.write_text(json.dumps(RECORDS))
    return path


def tiny_flags(tiny_llama_dir, data_file, output_dir, **overrides):
    flags = dict(
        base_model=str(tiny_llama_dir), data_path=str(data_file), output_dir=str(output_dir),
        batch_size=8, micro_batch_size=4, max_steps=4, learning_rate=1e-2, warmup_steps=0,
        cutoff_len=128, val_set_size=0, lora_r=4, lora_alpha=8, lora_dropout=0.1,
        save_steps=100, logging_steps=1, precision="fp32",
    )
    flags.update(overrides)
    return flags


def run_finetune(*args, env=None, module=None):
    command = [sys.executable, *(["-m", module] if module else []), *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, **(env or {})})


def adapter_weights(folder):
    return load_file(str(folder / "adapter_model.safetensors"))


# ---- errors before any model loads -----------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--lora_target_modules", "[q_proj,v_projj]"], "--lora_target_modules: the model has no module named v_projj; its linear layers are down_proj"),
    (["--data_path", "missing.json"], "data file not found: missing.json"),
    (["--batch_size", "2", "--micro_batch_size", "4"], "--batch_size (2) must be at least --micro_batch_size (4)"),
    (["--precision", "fp8"], "--precision must be auto, bf16, fp16 or fp32"),
    (["--resume_from_checkpoint", "True"], "--resume_from_checkpoint: no whole checkpoint in"),
])
def test_bad_flags_fail_in_one_line_before_the_model_loads(tiny_llama_dir, data_file, tmp_path, flags, message):
    result = run_finetune("finetune.py", "--base_model", tiny_llama_dir, "--data_path", data_file,
                          "--output_dir", tmp_path / "out", *flags)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "trainable params" not in result.stdout
    assert result.stderr.strip().splitlines()[-1].startswith("error: " + message)


@pytest.mark.parametrize("records, message", [
    ([{"instruction": "x", "input": ""}], "the records have no output field"),
    ([{"instruction": "x", "output": "y"}, {"instruction": "x", "output": None}], "1 record(s) lack a string instruction or output (first: record 1)"),
])
def test_records_without_the_needed_fields_are_refused(tmp_path, records, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    with pytest.raises(CodeUpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune.load_records(str(path))


def test_missing_input_field_means_empty(tmp_path):
    path = tmp_path / "no_input.jsonl"
    path.write_text(json.dumps({"instruction": "x", "output": "y"}) + "\n")
    assert finetune.load_records(str(path))[0] == {"instruction": "x", "input": "", "output": "y"}


# ---- labels -----------------------------------------------------------------------------

@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_training_examples_have_eos_masked_prompts_and_pad_not_eos(tiny_llama_dir, data_file, train_on_inputs):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    records = finetune.load_records(str(data_file))
    train, val = finetune.tokenize_records(records, tokenizer, "alpaca", 256, train_on_inputs, True, 4, seed=1)
    assert len(train) == len(RECORDS) - 4 and len(val) == 4
    for example in train:
        assert example["input_ids"][-1] == tokenizer.eos_token_id == example["labels"][-1]
        masked = example["labels"].count(IGNORE_INDEX)
        assert (masked == 0) == train_on_inputs
        if not train_on_inputs:  # masked exactly over the prompt, a prefix
            assert example["labels"][:masked] == [IGNORE_INDEX] * masked
            assert IGNORE_INDEX not in example["labels"][masked:]


def test_val_set_size_is_clamped_on_small_data(tiny_llama_dir, data_file):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    with pytest.warns(UserWarning, match="val_set_size 2000 is too large for 32 records; using 3"):
        train, val = finetune.tokenize_records(finetune.load_records(str(data_file)), tokenizer, "alpaca",
                                               256, False, True, 2000, seed=1)
    assert (len(train), len(val)) == (29, 3)


# ---- training, saving, reloading ---------------------------------------------------------

def test_saved_adapter_reloads_with_the_same_logits(tiny_llama_dir, data_file, tmp_path):
    output_dir = tmp_path / "run"
    trainer = finetune.train(**tiny_flags(tiny_llama_dir, data_file, output_dir, val_set_size=4, eval_steps=2))
    for name in ("adapter_model.safetensors", "adapter_config.json", "trainer_state.json", "loss.png"):
        assert (output_dir / name).is_file(), name
    weights = adapter_weights(output_dir)
    assert weights and all(tensor.numel() > 0 for tensor in weights.values())
    assert any("lora_B" in name and tensor.abs().sum() > 0 for name, tensor in weights.items())  # it learned
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and any("eval_loss" in entry for entry in state["log_history"])

    probe = torch.tensor([[1, 5, 17, 42, 99, 7]])
    model = trainer.model.eval()
    with torch.no_grad():
        expected = model(input_ids=probe).logits
    code = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from utils.model_loading import load_model\n"
        f"model = PeftModel.from_pretrained(load_model({str(tiny_llama_dir)!r}), {str(output_dir)!r}).eval()\n"
        f"torch.save(model(input_ids=torch.tensor({probe.tolist()})).logits.detach(), sys.argv[1])\n"
    )
    result = run_finetune("-c", code, tmp_path / "logits.pt", env={"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.allclose(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5)


def test_resume_matches_an_uninterrupted_run(tiny_llama_dir, data_file, tmp_path):
    # 32 records in batches of 8: 4 steps an epoch, so the resumed half crosses an epoch boundary.
    straight = tmp_path / "straight"
    finetune.train(**tiny_flags(tiny_llama_dir, data_file, straight, max_steps=8, save_steps=3))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    # A checkpoint a killed process was writing: newer, but without its completion marker.
    shutil.copytree(straight / "checkpoint-6", resumed / "checkpoint-6")
    (resumed / "checkpoint-6" / finetune.CHECKPOINT_COMPLETE).unlink()
    (resumed / "checkpoint-6" / "optimizer.pt").unlink()
    assert finetune.find_checkpoint(True, str(resumed)) == str(resumed / "checkpoint-3")

    finetune.train(**tiny_flags(tiny_llama_dir, data_file, resumed, max_steps=8, save_steps=3, resume_from_checkpoint=True))
    expected, actual = adapter_weights(straight), adapter_weights(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], atol=1e-6), name
    losses = lambda folder: [(e["step"], e["loss"]) for e in json.loads((folder / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses(resumed) == losses(straight)  # the curve continues where it stopped
    assert [step for step, _ in losses(resumed)] == list(range(1, 9))


def test_explicit_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    with pytest.raises(CodeUpError, match="not a whole checkpoint"):
        finetune.find_checkpoint(str(tmp_path / "checkpoint-5"), str(tmp_path))


def test_packed_rows_give_the_same_loss_as_padded_batches(tiny_llama_dir, data_file):
    import transformers

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = finetune.tokenize_records(finetune.load_records(str(data_file)), tokenizer, "alpaca", 256, False, True, 0, 1)
    by_length = sorted(train, key=lambda f: len(f["input_ids"]))
    features = by_length[:2] + by_length[-2:]  # different lengths, as in real data
    model = finetune.build_lora_model(str(tiny_llama_dir), tokenizer, False, False, torch.float32, False, 4, 8, 0.0, ["q_proj", "v_proj"])
    padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")(features)
    packed = transformers.DataCollatorWithFlattening()(features)
    assert packed["input_ids"].shape[0] == 1 and packed["input_ids"].shape[1] == sum(len(f["input_ids"]) for f in features)
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # padding waste is gone
    assert torch.allclose(model(**padded).loss, model(**packed).loss, atol=1e-5)


def test_8bit_base_trains_on_cpu(tiny_llama_dir, data_file, tmp_path):
    trainer = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "int8", load_in_8bit=True, max_steps=2))
    import bitsandbytes as bnb

    assert any(isinstance(module, bnb.nn.Linear8bitLt) for module in trainer.model.modules())
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert (tmp_path / "int8" / "adapter_model.safetensors").is_file()


def test_torchrun_two_processes_on_cpu(tiny_llama_dir, data_file, tmp_path):
    flags = tiny_flags(tiny_llama_dir, data_file, tmp_path / "ddp", max_steps=2)
    result = run_finetune("--nproc_per_node", "2", "finetune.py", *[f"--{k}={v}" for k, v in flags.items()],
                          module="torch.distributed.run", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
    # Each of the 2 processes takes micro_batch_size 4 and accumulates 8 // 4 // 2 = 1 step.
    args = torch.load(tmp_path / "ddp" / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 1 and args.world_size == 2


# ---- a real model on real data -----------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "code_alpaca_20k.json").is_file(), reason="../shared/data is not here")
def test_smollm2_loss_falls_on_real_records(smollm2_dir, tmp_path):
    records = json.loads((SHARED_DATA / "code_alpaca_20k.json").read_text())[:16]
    data = tmp_path / "real.json"
    data.write_text(json.dumps(records))
    trainer = finetune.train(
        base_model="smollm2-135m", data_path=str(data), output_dir=str(tmp_path / "smol"),
        batch_size=4, micro_batch_size=4, num_epochs=3, learning_rate=1e-3, warmup_steps=0,
        cutoff_len=256, val_set_size=0, lora_r=8, logging_steps=1, save_steps=1000,
        lora_target_modules="[q_proj,k_proj,v_proj,o_proj]",
    )
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 12
    assert sum(losses[-4:]) / 4 < 0.8 * sum(losses[:4]) / 4, losses
