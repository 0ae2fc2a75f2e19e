"""The training stage on the tiny random Llama (fast) and on SmolLM2-135M with real records."""

import functools
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import ROOT, SHARED_DATA

import finetune  # noqa: E402
from utils.train import attention
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


def tokenize(records, tokenizer, *, train_on_inputs=False, val_set_size=0):
    return finetune.tokenize_records(records, tokenizer=tokenizer, template="alpaca", cutoff_len=256,
                                     train_on_inputs=train_on_inputs, add_eos_token=True,
                                     val_set_size=val_set_size, seed=1)


def lora_model(tiny_llama_dir, tokenizer, **overrides):
    options = dict(base_model=str(tiny_llama_dir), tokenizer=tokenizer, load_in_8bit=False, load_in_4bit=False,
                   dtype=torch.float32, lora_r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return finetune.build_lora_model(**{**options, **overrides})


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
@pytest.mark.slow
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
    train, val = tokenize(records, tokenizer, train_on_inputs=train_on_inputs, val_set_size=4)
    assert len(train) == len(RECORDS) - 4 and len(val) == 4
    for example in train:
        assert example["input_ids"][-1] == tokenizer.eos_token_id == example["labels"][-1]
        masked = example["labels"].count(IGNORE_INDEX)
        assert (masked == 0) == train_on_inputs
        if not train_on_inputs:  # masked exactly over the prompt, a prefix
            assert example["labels"][:masked] == [IGNORE_INDEX] * masked
            assert IGNORE_INDEX not in example["labels"][masked:]


def test_val_set_size_is_clamped_on_small_data(tiny_llama_dir, data_file, capsys):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, val = tokenize(finetune.load_records(str(data_file)), tokenizer, val_set_size=2000)
    assert "warning: val_set_size 2000 is too large for 32 records; using 3" in capsys.readouterr().err
    assert (len(train), len(val)) == (29, 3)


# ---- training, saving, reloading ---------------------------------------------------------

@pytest.mark.slow
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
    assert finetune.find_checkpoint(True, output_dir=str(resumed)) == str(resumed / "checkpoint-3")

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
        finetune.find_checkpoint(str(tmp_path / "checkpoint-5"), output_dir=str(tmp_path))


def test_packed_rows_give_the_same_loss_as_padded_batches(tiny_llama_dir, data_file):
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    by_length = sorted(train, key=lambda f: len(f["input_ids"]))
    features = by_length[:2] + by_length[-2:]  # different lengths, as in real data
    model = lora_model(tiny_llama_dir, tokenizer)
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


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_llama_dir, data_file, tmp_path):
    import evaluate

    # Also pass@1 while training: each process answers half of the problems.
    flags = tiny_flags(tiny_llama_dir, data_file, tmp_path / "ddp", max_steps=2, eval_task="humaneval", eval_limit=3,
                       eval_steps=2, save_steps=2, eval_max_new_tokens=32)
    result = run_finetune("--nproc_per_node", "2", "finetune.py", *[f"--{k}={v}" for k, v in flags.items()],
                          module="torch.distributed.run", env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    state = json.loads((tmp_path / "ddp" / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    [logged] = [entry["eval_humaneval_pass@1"] for entry in state["log_history"] if "eval_humaneval_pass@1" in entry]
    evaluate.main(task="humaneval", base_model=str(tiny_llama_dir), lora_weights=str(tmp_path / "ddp" / "checkpoint-2"),
                  limit=3, max_new_tokens=32, output_dir=str(tmp_path / "evaluate"))
    assert logged == json.loads((tmp_path / "evaluate" / "humaneval_results.json").read_text())["pass@1"]
    in_training = samples_of(tmp_path / "ddp" / "eval_samples" / "step-2")
    assert [(s["task_id"], s["response"]) for s in in_training] == \
           [(s["task_id"], s["response"]) for s in samples_of(tmp_path / "evaluate")]
    assert (tmp_path / "ddp" / "adapter_model.safetensors").is_file()
    # Each of the 2 processes takes micro_batch_size 4 and accumulates 8 // 4 // 2 = 1 step.
    args = torch.load(tmp_path / "ddp" / "training_args.bin", weights_only=False)
    assert args.gradient_accumulation_steps == 1 and args.world_size == 2


# ---- pass@1 while training (--eval_task) ----------------------------------------------------

def samples_of(folder, task="humaneval"):
    return [json.loads(line) for line in (folder / f"{task}_samples.jsonl").read_text().splitlines()]


def test_pass_at_1_is_logged_at_each_evaluation_and_is_what_evaluate_py_gives(tiny_llama_dir, data_file, tmp_path, capsys):
    import evaluate

    output = tmp_path / "out"
    finetune.train(**tiny_flags(tiny_llama_dir, data_file, output, eval_task="humaneval", eval_limit=3, eval_steps=2,
                                save_steps=2, eval_max_new_tokens=48))
    state = json.loads((output / "trainer_state.json").read_text())
    logged = {entry["step"]: entry["eval_humaneval_pass@1"] for entry in state["log_history"]
              if "eval_humaneval_pass@1" in entry}
    assert sorted(logged) == [2, 4]  # every evaluation, without a validation set
    for step in (2, 4):
        evaluate.main(task="humaneval", base_model=str(tiny_llama_dir), lora_weights=str(output / f"checkpoint-{step}"),
                      limit=3, max_new_tokens=48, output_dir=str(tmp_path / f"evaluate-{step}"))
        scored = json.loads((tmp_path / f"evaluate-{step}" / "humaneval_results.json").read_text())
        assert scored["problems"] == 3 and logged[step] == scored["pass@1"]
        # The same answers, word for word: the same prompts, greedy decoding and scorer.
        in_training, by_evaluate = samples_of(output / "eval_samples" / f"step-{step}"), samples_of(tmp_path / f"evaluate-{step}")
        assert [s["task_id"] for s in in_training] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
        assert [(s["prompt"], s["response"], s["passed"]) for s in in_training] == \
               [(s["prompt"], s["response"], s["passed"]) for s in by_evaluate]


def scripted_answers(monkeypatch, script):
    """The in-training evaluations answer from `script` (one function of a problem per evaluation)
    instead of the model: the scorer and the sandbox are the real ones."""
    from utils.eval.programs import extract_code
    from utils.train import code_eval

    evaluations = iter(script)

    def answer_problems(generator, problems, **settings):
        answer = next(evaluations)
        return [{"task": p["task"], "task_id": p["task_id"], "prompt": "", "response": answer(p),
                 "code": extract_code(answer(p), p)} for p in problems]

    monkeypatch.setattr(code_eval, "answer_problems", answer_problems)


def test_pass_at_1_picks_the_checkpoint_kept(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    # Evaluation 1: programs that never end (the sandbox's timeout ends them); 2: the reference
    # solutions; 3: a syntax error. The best is step 4's, though the loss is lowest at step 6.
    scripted_answers(monkeypatch, [lambda p: f"def {p['entry_point']}(*args):\n    while True:\n        pass\n",
                                   lambda p: p["prompt"] + p["canonical_solution"],
                                   lambda p: "def broken(:\n"])
    output = tmp_path / "best"
    trainer = finetune.train(**tiny_flags(tiny_llama_dir, data_file, output, max_steps=6, eval_task="humaneval",
                                          eval_limit=2, eval_steps=2,
                                          metric_for_best_model="eval_humaneval_pass@1"))
    scores = [entry["eval_humaneval_pass@1"] for entry in trainer.state.log_history if "eval_humaneval_pass@1" in entry]
    assert scores == [0.0, 1.0, 0.0]
    timed_out = samples_of(output / "eval_samples" / "step-2")
    assert [s["status"] for s in timed_out] == ["timeout", "timeout"]
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-4")
    saved, best = adapter_weights(output), adapter_weights(output / "checkpoint-4")
    assert all(torch.equal(saved[name], best[name]) for name in best)
    assert not all(torch.equal(saved[name], last) for name, last in adapter_weights(output / "checkpoint-6").items())


@pytest.mark.parametrize("trouble", ["time limit", "error"])
def test_a_failing_evaluation_costs_no_step_and_no_checkpoint(tiny_llama_dir, data_file, tmp_path, monkeypatch, capfd, trouble):
    flags = dict(max_steps=4, eval_task="humaneval", eval_limit=2, eval_steps=2, save_steps=2)
    if trouble == "time limit":
        flags["eval_max_seconds"] = 1e-3
    else:
        from utils.train import code_eval

        def crash(*args, **kwargs):
            raise RuntimeError("the GPU caught fire")

        monkeypatch.setattr(code_eval, "answer_problems", crash)
    output = tmp_path / trouble.replace(" ", "-")
    trainer = finetune.train(**tiny_flags(tiny_llama_dir, data_file, output, **flags))
    scores = [entry["eval_humaneval_pass@1"] for entry in trainer.state.log_history if "eval_humaneval_pass@1" in entry]
    assert trainer.state.global_step == 4 and len(scores) == 2
    assert (output / "checkpoint-2" / "adapter_model.safetensors").is_file()
    stderr = capfd.readouterr().err
    if trouble == "time limit":
        assert scores == [0.0, 0.0] and "reached --eval_max_seconds" in stderr
    else:
        assert all(score != score for score in scores)  # NaN
        assert "the pass@1 evaluation at step 2 failed (RuntimeError: the GPU caught fire)" in stderr


@pytest.mark.parametrize("flags, message", [
    (dict(eval_task="apps"), "--eval_task 'apps' is not a task evaluate.py knows"),
    (dict(eval_task="humaneval", eval_limit=0), "--eval_limit must be at least 1"),
    (dict(eval_task="humaneval", metric_for_best_model="eval_mbpp_pass@1"),
     "--metric_for_best_model eval_mbpp_pass@1: no evaluation logs it; they log eval_humaneval_pass@1"),
    (dict(eval_task="humaneval", metric_for_best_model="loss"), "--metric_for_best_model eval_loss: no evaluation logs it"),
    (dict(metric_for_best_model="humaneval_pass@1"), "--metric_for_best_model eval_humaneval_pass@1: no evaluation logs it; set"),
    (dict(eval_task="humaneval,mbpp", mbpp_path="missing.jsonl"), "missing.jsonl"),
    (dict(eval_task="humaneval,humanevalx-go"), "go"),
])
def test_bad_eval_flags_fail_before_the_model_loads(tiny_llama_dir, data_file, tmp_path, monkeypatch, flags, message):
    from utils.eval import multilingual

    real_which = multilingual.shutil.which
    monkeypatch.setattr(multilingual.shutil, "which", lambda tool, path=None: None if tool == "go" else real_which(tool, path=path))
    monkeypatch.setattr(finetune, "load_tokenizer", lambda *args, **kwargs: pytest.fail("the model loaded"))
    with pytest.raises(CodeUpError, match=re.escape(message)):
        finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "x", **flags))


class Tasks:
    def __init__(self, *names):
        self.names = names

    def metric_names(self):
        return [f"eval_{name}_pass@1" for name in self.names]


@pytest.mark.parametrize("name, early_stopping, validation, tasks, expected", [
    ("", False, True, Tasks("humaneval"), None),  # nothing named: the last checkpoint
    ("", True, True, Tasks("humaneval"), "eval_loss"),
    ("", True, False, Tasks("humaneval"), "eval_humaneval_pass@1"),  # early stopping on the one pass@1
    ("humaneval_pass@1", False, True, Tasks("humaneval", "mbpp"), "eval_humaneval_pass@1"),
    ("", True, False, Tasks("humaneval", "mbpp"), "say which metric to watch"),
    ("", True, False, None, "needs an evaluation to watch"),
])
def test_the_metric_that_picks_the_checkpoint(name, early_stopping, validation, tasks, expected):
    choose = functools.partial(finetune.choose_best_metric, name, early_stopping=early_stopping, validation=validation,
                               code_evaluation=tasks)
    if expected and not expected.startswith("eval_"):
        with pytest.raises(CodeUpError, match=expected):
            choose()
    else:
        assert choose() == expected


def test_training_data_that_overlaps_the_scored_problems_is_warned_about(capfd):
    from utils.eval.benchmarks import load_humaneval
    from utils.train.code_eval import CodeEvaluation

    evaluation = CodeEvaluation(tasks=["humaneval"], limit=5, base_model="unused", prompt_template="alpaca",
                                mbpp_path="", benchmarks_dir="", max_new_tokens=64, max_seconds=60)
    problem = load_humaneval()[3]
    clean = [{"instruction": "Write a function that adds two numbers.", "input": "", "output": "def add(a, b): return a + b"}]
    assert evaluation.warn_about_overlap(clean) == 0 and "warning" not in capfd.readouterr().err
    leaked = clean + [{"instruction": "Complete this.", "input": problem["prompt"], "output": problem["canonical_solution"]}]
    assert evaluation.warn_about_overlap(leaked) == 1
    assert "1 of the 5 problems --eval_task scores share a 13-gram with the training data (HumanEval/3 (record 1))" \
        in capfd.readouterr().err


# ---- a real model on real data -----------------------------------------------------------

@pytest.mark.skipif(not (SHARED_DATA / "code_alpaca_20k.json").is_file(), reason="../shared/data is not here")
@pytest.mark.slow
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


# ---- attention over each example only -----------------------------------------------------

def test_no_token_attends_across_examples(tiny_llama_dir, data_file, monkeypatch):
    """The logits of each example inside a packed row equal its logits alone, and no attention
    call spans more than one example (no cross-example compute, no mask over the row)."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    features = [train[0], train[5], train[-1]]
    model = lora_model(tiny_llama_dir, tokenizer).eval()
    assert model.config._attn_implementation == finetune.PER_EXAMPLE_SDPA
    lengths = [len(f["input_ids"]) for f in features]
    packed = transformers.DataCollatorWithFlattening()(features)

    seen = []
    causal_attention = attention.causal_attention  # causal, over one example, with no mask
    monkeypatch.setattr(attention, "causal_attention", lambda q, k, v, **kw: seen.append(q.shape[2]) or causal_attention(q, k, v, **kw))
    with torch.no_grad():
        together = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        assert set(seen) == set(lengths)
        start = 0
        for feature, length in zip(features, lengths):
            alone = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
            assert torch.allclose(together[start:start + length], alone, atol=1e-5)
            start += length


def test_padded_batches_still_use_their_mask(tiny_llama_dir, data_file):
    """sdpa_per_example hands batches with padding to transformers' masked SDPA: same loss as sdpa."""
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    padded = transformers.DataCollatorForSeq2Seq(tokenizer, padding=True, return_tensors="pt")([train[0], train[-1]])
    ours = lora_model(tiny_llama_dir, tokenizer)
    theirs = lora_model(tiny_llama_dir, tokenizer, attn_implementation="sdpa")
    with torch.no_grad():
        assert torch.allclose(ours(**padded).loss, theirs(**padded).loss, atol=1e-6)


@pytest.mark.parametrize("name, packing, cuda, flash, expected", [
    ("auto", True, False, False, "sdpa_per_example"),
    ("auto", True, True, False, "sdpa_per_example"),
    ("auto", True, True, True, "flash_attention_2"),
    ("auto", False, True, True, "sdpa"),
    ("eager", True, False, False, "eager"),
])
def test_attention_choice(monkeypatch, name, packing, cuda, flash, expected):
    real_find_spec = finetune.importlib.util.find_spec
    monkeypatch.setattr(finetune.importlib.util, "find_spec",
                        lambda module: (object() if flash else None) if module == "flash_attn" else real_find_spec(module))
    assert finetune.choose_attention(name, packing=packing, cuda=cuda) == expected


def test_unavailable_attention_is_refused():
    with pytest.raises(CodeUpError, match="flash_attention_2 needs a GPU"):
        finetune.choose_attention("flash_attention_2", packing=True, cuda=False)
    with pytest.raises(CodeUpError, match="--attn_implementation must be one of"):
        finetune.choose_attention("fast", packing=True, cuda=False)


# ---- quantized bases: activation checkpointing on by default ------------------------------

def test_8bit_base_checkpoints_activations_by_default_with_the_same_loss(tiny_llama_dir, data_file, tmp_path):
    flags = dict(load_in_8bit=True, max_steps=3, lora_dropout=0.1)
    default = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "default", **flags))
    plain = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "plain", gradient_checkpointing=False, **flags))
    saved = lambda folder: getattr(torch.load(folder / "training_args.bin", weights_only=False), finetune.CHECKPOINTING)
    assert saved(tmp_path / "default") is True and saved(tmp_path / "plain") is False
    # Enabled once, by the Trainer; reentrant for an 8-bit base (see the next test).
    layer = default.model.base_model.model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
    assert not plain.model.base_model.model.model.layers[0].gradient_checkpointing
    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses(default)) == 3
    assert losses(default) == pytest.approx(losses(plain), abs=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_checkpointing_keeps_no_matmul_input_of_a_quantized_base_alive(tiny_llama_dir, data_file, bits):
    """Checkpointing exists to free each layer's activations until the backward pass. bitsandbytes'
    8-bit matmul keeps its input on its autograd context, where non-reentrant checkpointing cannot
    free it (1.1 GiB a Llama-2-7B layer on a GPU): finetune.py checkpoints 8-bit bases reentrantly."""
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    train, _ = tokenize(finetune.load_records(str(data_file)), tokenizer)
    batch = transformers.DataCollatorWithFlattening()([train[0]])

    def inputs_alive_after_forward(reentrant=None):
        """How many inputs of the quantized matmuls are still alive after the forward pass."""
        model = lora_model(tiny_llama_dir, tokenizer, load_in_8bit=bits == 8, load_in_4bit=bits == 4)
        assert finetune.checkpoint_reentrant(model) is (bits == 8)
        if reentrant is None:
            reentrant = finetune.checkpoint_reentrant(model)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        inputs = []
        quantized = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
        for module in model.modules():
            if isinstance(module, quantized):
                module.register_forward_pre_hook(lambda m, args: inputs.append(weakref.ref(args[0])))
        loss = model(**batch).loss
        gc.collect()
        assert len(inputs) == 2 * 7 and loss.requires_grad  # 7 linear layers in each of 2 decoder layers
        return sum(ref() is not None for ref in inputs)

    assert inputs_alive_after_forward() == 0
    if bits == 8:  # what non-reentrant checkpointing leaves: why 8-bit bases need the other kind
        assert inputs_alive_after_forward(reentrant=False) > 0


def test_bf16_with_checkpointing_trains_as_without(tiny_llama_dir, data_file, tmp_path):
    """Mixed precision (autocast) with activation checkpointing: the recomputed forward must match
    the first one (a forward that depends on state the recompute does not see fails here)."""
    flags = dict(precision="bf16", max_steps=2)
    with_checkpointing = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "ckpt", gradient_checkpointing=True, **flags))
    without = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "plain", **flags))
    losses = lambda trainer: [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses(with_checkpointing)) == 2
    assert losses(with_checkpointing) == pytest.approx(losses(without), abs=1e-2)


def test_full_precision_base_does_not_checkpoint_by_default(tiny_llama_dir, data_file, tmp_path):
    finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "fp32", max_steps=1))
    args = torch.load(tmp_path / "fp32" / "training_args.bin", weights_only=False)
    assert getattr(args, finetune.CHECKPOINTING) is False


# ---- knobs ----------------------------------------------------------------------------------

@pytest.mark.parametrize("optim, expected", [("sgd", ("torch.optim.sgd.SGD", None, None)),
                                             ("paged_adamw_8bit", ("bitsandbytes.optim.adamw.AdamW", 8, True))])
def test_the_optimizer_is_the_one_named(tiny_llama_dir, data_file, tmp_path, optim, expected):
    trainer = finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / optim, max_steps=1, optim=optim))
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it
    bits = getattr(getattr(optimizer, "args", None), "optim_bits", None)  # bitsandbytes' state precision
    assert (f"{type(optimizer).__module__}.{type(optimizer).__name__}", bits, getattr(optimizer, "is_paged", None)) == expected


def test_unknown_optimizer_is_refused():
    with pytest.raises(CodeUpError, match="--optim 'adamw' is not a transformers optimizer"):
        finetune.check_optimizer("adamw")


def test_all_linear_adapts_every_linear_layer_but_the_head(tiny_llama_dir):
    from peft.tuners.lora import LoraLayer

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    target = finetune.parse_target_modules("all-linear")
    finetune.check_target_modules(target, finetune.linear_module_names(str(tiny_llama_dir)))
    model = lora_model(tiny_llama_dir, tokenizer, target_modules=target)
    adapted = {name.removeprefix("base_model.model.") for name, module in model.named_modules() if isinstance(module, LoraLayer)}
    linear = finetune.linear_module_names(str(tiny_llama_dir))
    assert adapted == linear - {"lm_head"} and len(adapted) == 2 * 7


@pytest.mark.parametrize("value, adapted", [
    ("self_attn.q_proj,mlp.up_proj", {"q_proj", "up_proj"}),  # dotted suffixes
    (r".*layers\.1\.self_attn\.(k|o)_proj", {"k_proj", "o_proj"}),  # one regex over full names
])
def test_dotted_and_regex_target_modules(tiny_llama_dir, value, adapted):
    from peft.tuners.lora import LoraLayer

    target = finetune.parse_target_modules(value)
    finetune.check_target_modules(target, finetune.linear_module_names(str(tiny_llama_dir)))
    model = lora_model(tiny_llama_dir, load_tokenizer(str(tiny_llama_dir)), target_modules=target)
    names = [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]
    assert names and {name.rsplit(".", 1)[-1] for name in names} == adapted


def test_regex_that_matches_nothing_is_refused(tiny_llama_dir):
    with pytest.raises(CodeUpError, match="matches no linear layer"):
        finetune.check_target_modules(r".*\.qq_proj", finetune.linear_module_names(str(tiny_llama_dir)))


def test_early_stopping_stops_and_keeps_the_best(tiny_llama_dir, data_file, tmp_path):
    evaluations = []

    class Recorder(finetune.transformers.TrainerCallback):  # also proves train(callbacks=...)
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evaluations.append((state.global_step, metrics["eval_loss"]))

    # A learning rate far too high: the eval loss gets worse after the first steps.
    trainer = finetune.train(**tiny_flags(
        tiny_llama_dir, data_file, tmp_path / "early", max_steps=20, learning_rate=3.0, val_set_size=4,
        eval_steps=1, save_steps=1, save_total_limit=2, early_stopping_patience=2, callbacks=[Recorder()]))
    best_step, best_loss = min(evaluations, key=lambda e: e[1])
    assert trainer.state.global_step < 20 and trainer.state.global_step == evaluations[-1][0]
    assert [loss for _, loss in evaluations[-2:]] >= [best_loss, best_loss]  # two without improvement
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    saved, best = adapter_weights(tmp_path / "early"), adapter_weights(tmp_path / "early" / f"checkpoint-{best_step}")
    assert all(torch.equal(saved[name], best[name]) for name in best)


def test_early_stopping_needs_a_validation_set(tiny_llama_dir, data_file, tmp_path):
    with pytest.raises(CodeUpError, match="--early_stopping_patience needs an evaluation to watch"):
        finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "x", early_stopping_patience=2))


# ---- plumbing -------------------------------------------------------------------------------

def training_arguments(tmp_path, **overrides):
    options = dict(output_dir=str(tmp_path), micro_batch_size=4, gradient_accumulation_steps=2, num_epochs=1,
                   max_steps=10, learning_rate=1e-3, warmup_steps=0, optim="adamw_torch", precision="fp32",
                   gradient_checkpointing=False, reentrant_checkpointing=False, group_by_length=False, evaluate=True,
                   best_metric=None,
                   save_steps=200, eval_steps=200, logging_steps=1, save_total_limit=1, report_to="none",
                   run_name="", seed=1, world_size=1, cuda=False)
    return finetune.build_training_arguments(**{**options, **overrides})


def test_helpers_take_keywords_so_swapped_arguments_still_mean_what_they_say(tmp_path):
    args = training_arguments(tmp_path, eval_steps=5, save_steps=7)  # in the "wrong" order
    assert (args.save_steps, args.eval_steps) == (7, 5)
    with pytest.raises(TypeError):
        finetune.check_batch_sizes(16, 4, 1)
    with pytest.raises(TypeError):
        finetune.train("smollm2-135m")


def test_explicit_plain_transformers_checkpoint_is_accepted_with_a_warning(tmp_path, capsys):
    plain = tmp_path / "checkpoint-7"
    plain.mkdir()
    (plain / "trainer_state.json").write_text("{}")
    assert finetune.find_checkpoint(str(plain), output_dir=str(tmp_path)) == str(plain)
    assert "no checkpoint_complete marker" in capsys.readouterr().err
    with pytest.raises(CodeUpError, match="no whole checkpoint"):  # True still takes whole ones only
        finetune.find_checkpoint(True, output_dir=str(tmp_path))


def test_each_process_takes_its_own_gpu_before_any_other_cuda_call(tiny_llama_dir, data_file, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: calls.append(("capability", index)) or (8, 6))
    with pytest.raises(CodeUpError, match="data file not found"):
        finetune.train(**tiny_flags(tiny_llama_dir, tmp_path / "missing.json", tmp_path / "out", precision="auto"))
    assert calls[0] == ("set_device", 1) and ("capability", None) in calls


# ---- sharded (FSDP) under accelerate launch --------------------------------------------------

from conftest import free_port  # noqa: E402

CPU_FSDP2_LINE = ("FSDP2 on CPUs (gloo; accelerate alone would train DDP here, finetune.py shards as on GPUs): each of "
                  "the 2 processes holds 1/2 of the frozen base weights (one shard group per decoder layer); the "
                  "adapter is gathered at the end")


def accelerate_launch(flags: dict, *, config="fsdp2.yaml", launch_flags=()):
    """finetune.py on 2 CPU processes, launched as the README shows (`accelerate launch --config_file
    configs/accelerate/<config> --num_processes 2 finetune.py ...`), on a free port."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2",
               "--main_process_port", str(free_port()), *launch_flags,
               "finetune.py", *[f"--{key}={value}" for key, value in flags.items()]]
    env = {key: value for key, value in os.environ.items() if not key.startswith(("ACCELERATE_", "FSDP_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def losses_of(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture
def fsdp_environment(monkeypatch):
    """What `accelerate launch --config_file configs/accelerate/<config> --num_processes 2` puts in
    each process's environment, as far as finetune.py's plan reads it."""
    def launched(version=2, **more):
        for key in list(os.environ):
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.delenv(key)
        monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
        monkeypatch.setenv("FSDP_VERSION", str(version))
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
        for key, value in more.items():
            monkeypatch.setenv(key, value)
    return launched


def test_fsdp_plan_in_finetune_turns_the_8bit_default_off_and_refuses_what_cannot_shard(fsdp_environment, capsys,
                                                                                         monkeypatch):
    fsdp_environment()
    plan, load_in_8bit = finetune.plan_sharding(cuda=True, load_in_8bit=None, load_in_4bit=False)
    assert plan.sharded and plan.fsdp_version == 2 and load_in_8bit is False
    assert capsys.readouterr().err.strip() == ("FSDP2: each of the 2 processes holds 1/2 of the frozen base weights (one "
                                               "shard group per decoder layer); the adapter is gathered at the end; "
                                               "--load_in_8bit is off by default under FSDP (an 8-bit base cannot be sharded)")
    with pytest.raises(CodeUpError, match="^an 8-bit base cannot be sharded with FSDP2"):  # asked for: the error
        finetune.plan_sharding(cuda=True, load_in_8bit=True, load_in_4bit=False)
    with pytest.raises(CodeUpError, match="^a 4-bit base cannot be sharded with FSDP2.*fsdp_qlora.yaml"):
        finetune.plan_sharding(cuda=True, load_in_8bit=None, load_in_4bit=True)
    with pytest.raises(CodeUpError, match="^--eval_task with the base sharded"):
        finetune.plan_sharding(cuda=False, load_in_8bit=None, load_in_4bit=False, eval_task="humaneval")
    fsdp_environment(FSDP_ACTIVATION_CHECKPOINTING="true")
    with pytest.raises(CodeUpError, match="fsdp_activation_checkpointing.*--gradient_checkpointing"):
        finetune.plan_sharding(cuda=True, load_in_8bit=None, load_in_4bit=False)

    fsdp_environment(version=1)  # fsdp_qlora.yaml
    plan, load_in_8bit = finetune.plan_sharding(cuda=True, load_in_8bit=None, load_in_4bit=True)
    assert plan.sharded and plan.quant_storage_as_compute_dtype and not load_in_8bit
    assert capsys.readouterr().err.startswith("FSDP1 QLoRA: the 4-bit weights are stored in the compute dtype")
    # on a CPU, FSDP1 cannot run: DDP, said, and accelerate told (its FSDP1 plugin refuses a CPU)
    plan, _ = finetune.plan_sharding(cuda=False, load_in_8bit=None, load_in_4bit=False)
    assert not plan.sharded and plan.ddp_instead and os.environ["ACCELERATE_USE_FSDP"] == "false"
    assert capsys.readouterr().err.strip() == (
        "warning: an FSDP1 configuration on a CPU: accelerate cannot shard there, so this run trains DDP instead "
        "(every process holds the whole model); configs/accelerate/fsdp2.yaml shards on CPUs too")
    # no FSDP: nothing said, nothing changed
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION"):
        monkeypatch.delenv(key)
    plan, load_in_8bit = finetune.plan_sharding(cuda=True, load_in_8bit=None, load_in_4bit=False)
    assert (plan.sharded, plan.line, load_in_8bit) == (False, "", None) and capsys.readouterr().err == ""


def test_fsdp_precision_must_agree_with_the_launch_configuration(fsdp_environment):
    fsdp_environment()  # mixed_precision: bf16, as fsdp2.yaml and fsdp_qlora.yaml ship
    assert finetune.match_launch_precision("auto", cuda=False) == "bf16"
    assert finetune.match_launch_precision("bf16", cuda=True) == "bf16"
    with pytest.raises(CodeUpError, match="^--precision fp32 disagrees with the accelerate configuration's "
                                          "mixed_precision bf16: pass --precision bf16, or launch with --mixed_precision no"):
        finetune.match_launch_precision("fp32", cuda=False)
    fsdp_environment(ACCELERATE_MIXED_PRECISION="fp16")
    with pytest.raises(CodeUpError, match="mixed_precision fp16 needs a GPU"):
        finetune.match_launch_precision("auto", cuda=False)
    fsdp_environment(ACCELERATE_MIXED_PRECISION="no")  # the configuration leaves it to --precision
    assert finetune.match_launch_precision("fp32", cuda=False) == "fp32"
    assert finetune.match_launch_precision("auto", cuda=False) == "auto"


def test_fsdp_loading_has_no_device_map_and_stores_4bit_weights_in_the_compute_dtype(tiny_llama_dir, monkeypatch):
    import utils.model_loading

    calls = []
    monkeypatch.setattr(utils.model_loading.AutoModelForCausalLM, "from_pretrained",
                        lambda path, **options: calls.append(options))
    utils.model_loading.load_model(str(tiny_llama_dir), load_in_4bit=True, dtype=torch.bfloat16, device="cuda",
                                   sharded=True, quant_storage=torch.bfloat16)
    utils.model_loading.load_model(str(tiny_llama_dir), load_in_4bit=True, dtype=torch.bfloat16, device="cuda")
    sharded, unsharded = calls
    assert sharded["device_map"] is None and sharded["dtype"] == torch.bfloat16
    assert sharded["quantization_config"].bnb_4bit_quant_storage == torch.bfloat16
    assert unsharded["device_map"] == {"": 0} and unsharded["quantization_config"].bnb_4bit_quant_storage == torch.uint8


def test_fsdp2_accelerate_launch_on_cpus_trains_sharded_and_saves_a_peft_adapter(tiny_llama_dir, data_file, tmp_path):
    """The issue's command as it is: `accelerate launch --config_file configs/accelerate/fsdp2.yaml
    --num_processes 2 finetune.py ...` on a CPU trains sharded (never DDP unsaid), in the config's bf16,
    with finetune.py's activation checkpointing and an evaluation, and leaves a normal PEFT adapter in
    --output_dir and in each checkpoint."""
    from peft import PeftModel, get_peft_model_state_dict

    output_dir = tmp_path / "fsdp2"
    flags = tiny_flags(tiny_llama_dir, data_file, output_dir, max_steps=2, save_steps=1, lora_dropout=0.0,
                       gradient_checkpointing=True, val_set_size=4, eval_steps=2)
    del flags["precision"]  # auto: the configuration's mixed_precision (bf16)
    result = accelerate_launch(flags)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count(CPU_FSDP2_LINE) == 1  # one line, from rank 0
    assert "speed-ups: on: per-example attention, chunked loss; off: CPU kernels (the base is sharded by FSDP)" \
        in result.stderr
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.bf16 and args.world_size == 2 and args.gradient_accumulation_steps == 1
    assert getattr(args, finetune.CHECKPOINTING)
    assert getattr(args, f"{finetune.CHECKPOINTING}_kwargs") == {"use_reentrant": False}
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [entry["step"] for entry in state["log_history"] if "eval_loss" in entry] == [2]
    for step in (1, 2):  # each checkpoint: the sharded state, the gathered adapter, the marker last
        checkpoint = output_dir / f"checkpoint-{step}"
        assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / finetune.CHECKPOINT_COMPLETE).is_file()
        assert (checkpoint / "adapter_model.safetensors").is_file() and (checkpoint / "prompt_template.json").is_file()
    assert (output_dir / "prompt_template.json").is_file() and (output_dir / "tokenizer_config.json").is_file()

    saved = adapter_weights(output_dir)
    tokenizer = load_tokenizer(str(tiny_llama_dir))
    assert sorted(saved) == sorted(get_peft_model_state_dict(lora_model(tiny_llama_dir, tokenizer)))
    assert all(value.abs().max() > 0 for key, value in saved.items() if "lora_B" in key)  # trained
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(output_dir))
    for key, value in get_peft_model_state_dict(loaded).items():
        torch.testing.assert_close(value, saved[key])
    last_checkpoint = adapter_weights(output_dir / "checkpoint-2")
    assert all(torch.equal(last_checkpoint[key], saved[key]) for key in saved)


@pytest.mark.slow
def test_fsdp2_launch_equals_one_process_and_resumes_sharded(tiny_llama_dir, data_file, tmp_path):
    """In fp32 (launched with mixed_precision no), the sharded run's losses and adapter equal one
    process's on the same batches (per-example attention and the chunked loss on), and a run resumed
    from its sharded checkpoint ends where the uninterrupted one ends."""
    flags = dict(max_steps=3, save_steps=1, lora_dropout=0.0, precision="fp32")
    sharded_dir, resumed_dir = tmp_path / "sharded", tmp_path / "resumed"
    result = accelerate_launch(tiny_flags(tiny_llama_dir, data_file, sharded_dir, **flags),
                               launch_flags=("--mixed_precision", "no"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert CPU_FSDP2_LINE in result.stderr
    finetune.train(**tiny_flags(tiny_llama_dir, data_file, tmp_path / "one", **flags))
    sharded, one = losses_of(sharded_dir), losses_of(tmp_path / "one")
    assert sorted(sharded) == [1, 2, 3]
    for step in sharded:
        assert sharded[step] == pytest.approx(one[step], rel=1e-4)
    expected = adapter_weights(tmp_path / "one")
    for key, value in adapter_weights(sharded_dir).items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4)

    result = accelerate_launch(tiny_flags(tiny_llama_dir, data_file, resumed_dir, **flags,
                                          resume_from_checkpoint=sharded_dir / "checkpoint-1"),
                               launch_flags=("--mixed_precision", "no"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(losses_of(resumed_dir)) == [1, 2, 3]  # the state's history, carried on from step 1
    assert losses_of(resumed_dir)[3] == pytest.approx(sharded[3], abs=2e-4)  # logged to 4 decimals
    resumed = adapter_weights(resumed_dir)
    for key, value in adapter_weights(sharded_dir).items():
        torch.testing.assert_close(resumed[key], value, atol=1e-6, rtol=1e-5)


def test_fsdp_checkpoints_resume_only_as_they_were_written(tmp_path):
    sharded, plain = tmp_path / "checkpoint-2", tmp_path / "checkpoint-3"
    (sharded / "pytorch_model_fsdp_0").mkdir(parents=True)
    plain.mkdir()
    finetune.check_checkpoint_sharding(str(sharded), sharded=True)
    finetune.check_checkpoint_sharding(str(plain), sharded=False)
    finetune.check_checkpoint_sharding(None, sharded=True)
    with pytest.raises(CodeUpError, match="a sharded \\(FSDP\\) checkpoint resumes only with the base sharded"):
        finetune.check_checkpoint_sharding(str(sharded), sharded=False)
    with pytest.raises(CodeUpError, match="not a sharded \\(FSDP\\) checkpoint"):
        finetune.check_checkpoint_sharding(str(plain), sharded=True)


@pytest.mark.slow
def test_fsdp1_launch_on_cpus_trains_ddp_and_says_so(tiny_llama_dir, data_file, tmp_path):
    """fsdp_qlora.yaml (FSDP1) on CPUs: FSDP1 does not run there, so the run trains DDP, says so in
    one line, and saves the adapter as any DDP run does (never DDP unsaid, never a crash)."""
    output_dir = tmp_path / "fsdp1"
    result = accelerate_launch(tiny_flags(tiny_llama_dir, data_file, output_dir, max_steps=2, precision="bf16"),
                               config="fsdp_qlora.yaml")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stderr.count(
        "warning: an FSDP1 configuration on a CPU: accelerate cannot shard there, so this run trains DDP instead "
        "(every process holds the whole model); configs/accelerate/fsdp2.yaml shards on CPUs too") == 1
    assert "FSDP2 on CPUs" not in result.stderr
    args = torch.load(output_dir / "training_args.bin", weights_only=False)
    assert args.world_size == 2 and args.bf16
    assert (output_dir / "adapter_model.safetensors").is_file()
