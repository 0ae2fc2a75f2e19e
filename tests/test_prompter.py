import json

import pytest

from utils.errors import CodeUpError
from utils.prompter import Prompter, available_templates, load_template

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSort the list.\n\n### Input:\n[3, 1, 2]\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nSort the list.\n\n### Response:\n"
)


def test_shipped_templates_are_complete():
    assert {"alpaca", "alpaca_legacy", "alpaca_short"} <= set(available_templates())
    for name in available_templates():
        template = load_template(name)
        assert set(template) >= {"description", "prompt_input", "prompt_no_input", "response_split"}
        assert template["prompt_no_input"].rstrip().endswith(template["response_split"])
        assert template["prompt_input"].rstrip().endswith(template["response_split"])


def test_default_template_text_with_and_without_input():
    prompter = Prompter()
    assert prompter.generate_prompt("Sort the list.", "[3, 1, 2]") == ALPACA_WITH_INPUT
    assert prompter.generate_prompt("Sort the list.") == ALPACA_NO_INPUT


@pytest.mark.parametrize("empty", [None, "", "   \n", "<noinput>"])
def test_empty_input_uses_the_no_input_prompt(empty):
    assert Prompter().generate_prompt("Sort the list.", empty) == ALPACA_NO_INPUT


def test_label_is_appended_after_the_prompt():
    assert Prompter().generate_prompt("Sort the list.", "", label="sorted(x)") == ALPACA_NO_INPUT + "sorted(x)"


def test_legacy_template_has_no_newline_after_the_response_header():
    prompt = Prompter("alpaca_legacy").generate_prompt("Sort the list.")
    assert prompt.endswith("### Response:")


def test_unicode_and_braces_in_data_are_kept_verbatim():
    instruction = "Écris une fonction qui renvoie {x: 1} en 日本語 🐍"
    prompt = Prompter().generate_prompt(instruction, "f'{name}'")
    assert instruction in prompt and "f'{name}'" in prompt


def test_response_from_a_continuation_stops_at_the_next_section():
    continuation = "\n```python\nsorted(x)\n```\n\n### Instruction:\nMore\n\n### Response:\nnot this"
    assert Prompter().response_from_continuation(continuation) == "```python\nsorted(x)\n```"


def test_response_without_a_header_is_the_stripped_text():
    assert Prompter().response_from_continuation("  just an answer \n") == "just an answer"


def test_template_from_a_path(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({
        "description": "test", "prompt_input": "Q: {instruction} / {input}\nA:",
        "prompt_no_input": "Q: {instruction}\nA:", "response_split": "A:",
    }))
    prompter = Prompter(str(path))
    assert prompter.generate_prompt("hi", "there") == "Q: hi / there\nA:"
    assert prompter.response_from_continuation(" hello\nA: and more") == "hello"  # its own header ends the answer


def test_bad_templates_raise_clear_errors(tmp_path):
    with pytest.raises(CodeUpError, match="unknown prompt template 'nope'.*alpaca"):
        load_template("nope")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(CodeUpError, match="not valid JSON"):
        load_template(str(broken))
    incomplete = tmp_path / "incomplete.json"
    incomplete.write_text(json.dumps({"description": "x", "prompt_input": "{instruction}{input}"}))
    with pytest.raises(CodeUpError, match="lacks the keys prompt_no_input, response_split"):
        load_template(str(incomplete))
