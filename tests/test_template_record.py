"""The prompt template travels with the adapter: finetune.py records it, the other stages use it."""

import json

import pytest

from utils.errors import CodeUpError
from utils.prompter import (
    TEMPLATE_RECORD, Prompter, load_template, read_template_record, resolve_prompt_template, save_template_record,
)

RECORDS = [
    {"instruction": f"Write a Python function that returns {n} times its argument.", "input": "",
     "output": f"def times_{n}(x):\n    return {n} * x"}
    for n in range(16)
]


def test_a_record_is_used_by_default_and_an_explicit_other_template_warns(tmp_path, capsys):
    save_template_record(tmp_path, name="alpaca_short", template=load_template("alpaca_short"))
    assert read_template_record(tmp_path)["name"] == "alpaca_short"
    assert resolve_prompt_template(None, tmp_path) == load_template("alpaca_short")
    assert capsys.readouterr().err == ""

    assert resolve_prompt_template("alpaca", tmp_path) == load_template("alpaca")
    warning = capsys.readouterr().err
    assert warning.startswith("warning: ") and "'alpaca_short'" in warning and "'alpaca'" in warning

    resolve_prompt_template("alpaca_short", tmp_path)  # the same template: nothing to say
    assert capsys.readouterr().err == ""


def test_adapters_without_a_record_keep_the_default(tmp_path):
    assert resolve_prompt_template(None, tmp_path) == load_template("alpaca")
    assert resolve_prompt_template(None, None) == load_template("alpaca")
    assert resolve_prompt_template("alpaca_legacy", tmp_path) == load_template("alpaca_legacy")


def test_a_broken_record_is_one_clear_error(tmp_path):
    (tmp_path / TEMPLATE_RECORD).write_text('{"name": "x", "template": {"prompt_input": "{instruction}"}}')
    with pytest.raises(CodeUpError, match="lacks the keys"):
        read_template_record(tmp_path)
    (tmp_path / TEMPLATE_RECORD).write_bytes(b"\xff\xfe garbage")
    with pytest.raises(CodeUpError, match=TEMPLATE_RECORD):
        read_template_record(tmp_path)


@pytest.mark.slow
def test_finetune_records_its_template_in_the_adapter_and_every_checkpoint(tiny_llama_dir, tmp_path):
    import finetune

    data = tmp_path / "records.json"
    data.write_text(json.dumps(RECORDS))
    custom = dict(load_template("alpaca"), prompt_no_input="Task: {instruction}\nAnswer:\n")
    custom_file = tmp_path / "my_template.json"
    custom_file.write_text(json.dumps(custom))
    output = tmp_path / "lora"
    finetune.train(
        base_model=str(tiny_llama_dir), data_path=str(data), output_dir=str(output), prompt_template=str(custom_file),
        batch_size=8, micro_batch_size=4, max_steps=2, save_steps=1, warmup_steps=0, cutoff_len=64, val_set_size=0,
        lora_r=4, lora_alpha=8, report_to="none",
    )
    checkpoints = sorted(output.glob("checkpoint-*"))
    assert checkpoints
    for folder in [output, *checkpoints]:
        record = read_template_record(folder)
        assert record == {"name": "my_template", "template": custom}
    # A Prompter built for that adapter prompts exactly as training did.
    prompter = Prompter(resolve_prompt_template(None, output))
    assert prompter.generate_prompt("Add two numbers.") == "Task: Add two numbers.\nAnswer:\n"
