"""Chat-format data: the three record formats, assistant-only labels, cutting, bad records, and a
chat-tuned adapter that generation prompts with the base's chat template."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.chat_data import (
    CHAT, BadRecord, load_chat_records, record_to_messages, render_chat, resolve_prompt_format, tokenize_conversation,
)
from utils.model_loading import load_tokenizer
from utils.tokenization import IGNORE_INDEX

ALPACA = {"instruction": "Add two numbers.", "input": "in Python", "output": "def add(a, b):\n    return a + b"}
MESSAGES = {"messages": [
    {"role": "system", "content": "You write code."},
    {"role": "user", "content": "Print hello in Python."},
    {"role": "assistant", "content": "print('hello')"},
    {"role": "user", "content": "And in C?"},
    {"role": "assistant", "content": "puts(\"hello\");"},
]}
SHAREGPT = {"conversations": [
    {"from": "human", "value": "Reverse a list in Python."},
    {"from": "gpt", "value": "items[::-1]"},
]}


def test_the_three_formats_become_messages():
    assert record_to_messages(ALPACA) == [{"role": "user", "content": "Add two numbers.\n\nin Python"},
                                          {"role": "assistant", "content": ALPACA["output"]}]
    assert record_to_messages(MESSAGES) == MESSAGES["messages"]
    assert record_to_messages(SHAREGPT) == [{"role": "user", "content": "Reverse a list in Python."},
                                            {"role": "assistant", "content": "items[::-1]"}]


@pytest.mark.parametrize("record, why", [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown role"),
    ({"conversations": [{"from": "human", "value": "only a question"}]}, "no assistant turn"),
    ({"text": "plain"}, "neither"),
])
def test_bad_records_say_why(record, why):
    with pytest.raises(BadRecord, match=why):
        record_to_messages(record)


@pytest.fixture(scope="module", params=["tiny", "smollm2"])
def tokenizer(request, tiny_llama_dir):
    return load_tokenizer(str(tiny_llama_dir) if request.param == "tiny" else "smollm2-135m")


def expected_labels(tokenizer, messages):
    """Independently: the conversation tokenized as one text; each assistant turn's tokens are
    those its answer adds to the tokens of the prompt before it (rendered with the generation prompt)."""
    ids, labels, rendered = [], [], []
    for index, message in enumerate(messages):
        if message["role"] == "assistant":
            encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt = encode(render_chat(tokenizer, messages[:index], add_generation_prompt=True))
            full = encode(render_chat(tokenizer, messages[:index + 1], add_generation_prompt=False))
            assert prompt[:len(rendered)] == rendered and full[:len(prompt)] == prompt
            labels += [IGNORE_INDEX] * (len(prompt) - len(rendered)) + full[len(prompt):]
            ids, rendered = full, full
    return ids, labels


@pytest.mark.parametrize("record", [ALPACA, MESSAGES, SHAREGPT], ids=["alpaca", "messages", "sharegpt"])
def test_labels_cover_exactly_the_assistant_turns(tokenizer, record):
    messages = record_to_messages(record)
    example = tokenize_conversation(tokenizer, messages, cutoff_len=4096)
    ids, labels = expected_labels(tokenizer, messages)
    assert example["input_ids"] == ids and example["labels"] == labels
    # What is learned is the answers' text (and the template's end-of-turn marks), nothing of the prompts.
    learned = tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])
    for message in messages:
        assert (message["content"] in learned) == (message["role"] == "assistant")
    assert sum(1 for l in example["labels"] if l != IGNORE_INDEX) > 0
    # The whole text is the template's rendering of the conversation.
    assert tokenizer.decode(example["input_ids"]) == tokenizer.decode(
        tokenizer(render_chat(tokenizer, messages, add_generation_prompt=False), add_special_tokens=False)["input_ids"])


def test_cutoff_ends_after_a_whole_turn(tokenizer):
    messages = record_to_messages(MESSAGES)
    whole = tokenize_conversation(tokenizer, messages, cutoff_len=4096)
    first_turn = tokenize_conversation(tokenizer, messages[:3], cutoff_len=4096)
    cut = tokenize_conversation(tokenizer, messages, cutoff_len=len(whole["input_ids"]) - 1)
    assert cut == first_turn  # the second exchange does not fit: it is left out whole
    inside = tokenize_conversation(tokenizer, messages[:3], cutoff_len=len(first_turn["input_ids"]) - 2)
    assert inside["labels"] == first_turn["labels"][:-2]  # a first answer too long is cut inside it


def test_mixed_files_load_and_bad_records_are_reported_with_file_and_line(tmp_path, capsys):
    first = tmp_path / "a.jsonl"
    first.write_text("\n".join(json.dumps(r) for r in [ALPACA, MESSAGES, {"messages": []}]) + "\n")
    second = tmp_path / "b.json"
    second.write_text(json.dumps([SHAREGPT, {"conversations": [{"from": "alien", "value": "x"}]}]))
    records = load_chat_records(f"{first},{second}")
    assert len(records) == 3 and records[2]["messages"][0]["content"] == "Reverse a list in Python."
    warning = capsys.readouterr().err
    assert "2 record(s) skipped" in warning
    assert f"{first} line 3: empty conversation" in warning and f"{second} record 2: unknown role 'alien'" in warning


def test_a_chat_record_selects_the_chat_template(tmp_path):
    (tmp_path / "prompt_template.json").write_text(json.dumps({"name": "chat", "template": None}))
    assert resolve_prompt_format(None, tmp_path) == CHAT
    assert resolve_prompt_format("alpaca_short", tmp_path)["response_split"] == "### Response:"
    assert resolve_prompt_format(None, None)["response_split"] == "### Response:"


@pytest.mark.slow
@pytest.mark.parametrize("base", ["tiny", "smollm2"])
def test_finetune_chat_on_mixed_records_and_generate_uses_the_chat_template(base, tiny_llama_dir, smollm2_dir, tmp_path):
    data = tmp_path / "mixed.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [ALPACA, MESSAGES, SHAREGPT] * 4) + "\n")
    base_model = str(tiny_llama_dir) if base == "tiny" else "smollm2-135m"
    output = tmp_path / "adapter"
    run = subprocess.run([sys.executable, "finetune.py", *map(str, [
                              "--base_model", base_model, "--data_path", data, "--output_dir", output,
                              "--prompt_template_name", "chat", "--max_steps", 2, "--batch_size", 4,
                              "--micro_batch_size", 2, "--val_set_size", 0, "--cutoff_len", 256, "--save_steps", 100,
                              "--warmup_steps", 0, "--precision", "fp32"])],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((output / "prompt_template.json").read_text()) == {"name": "chat", "template": None}

    from utils.serve.generation import Generator

    generator = Generator(base_model, str(output))
    assert generator.chat
    tokenizer = generator.tokenizer
    prompt = generator.prompter.generate_prompt("Print hello in Python.")
    assert prompt == render_chat(tokenizer, [{"role": "user", "content": "Print hello in Python."}], add_generation_prompt=True)
    answer = subprocess.run([sys.executable, "generate.py", *map(str, [
                                 "--base_model", base_model, "--lora_weights", output, "--instruction",
                                 "Print hello in Python.", "--temperature", 0, "--max_new_tokens", 8])],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.rstrip("\n") == generator.answer("Print hello in Python.", temperature=0, max_new_tokens=8)
