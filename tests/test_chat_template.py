"""The training prompt as a chat template: what exports carry for transformers, llama.cpp and Ollama."""

import json

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from conftest import SHARED_DATA
from utils.prompter import Prompter, available_templates, chat_template, load_template, ollama_template, prompt_parts

EOS = "<|im_end|>"
# A template of someone's own, with braces, quotes, backslashes and a response header that is not
# at the very end: the builder must keep every character.
ODD_TEMPLATE = {
    "description": "odd", "prompt_input": "{instruction} / {input}\n>>> Answer:\n",
    "prompt_no_input": "Task {{json}} 'q' \"dq\" \\n\t{instruction}\n>>> Answer:\n  ", "response_split": ">>> Answer:",
}


def code_alpaca_instructions(count=50):
    records = json.loads((SHARED_DATA / "code_alpaca_20k.json").read_text(encoding="utf-8"))
    return [record["instruction"] for record in records[:count]]


def render(template: dict, messages, add_generation_prompt=True) -> str:
    return render_jinja_template([messages], chat_template=chat_template(template), add_generation_prompt=add_generation_prompt,
                                 eos_token=EOS, bos_token="<s>")[0][0]


@pytest.mark.skipif(not (SHARED_DATA / "code_alpaca_20k.json").is_file(), reason="../shared/data is not here")
@pytest.mark.parametrize("name", available_templates())
def test_one_user_message_renders_the_training_prompt(name):
    template = load_template(name)
    prompter = Prompter(template)
    for instruction in code_alpaca_instructions():
        assert render(template, [{"role": "user", "content": instruction}]) == prompter.generate_prompt(instruction)


def test_every_character_of_an_odd_template_is_kept():
    prompter = Prompter(ODD_TEMPLATE)
    for instruction in ["x", "use {braces} and '{{quotes}}'", "{% raw %} {{ not jinja }} \\ end"]:
        assert render(ODD_TEMPLATE, [{"role": "user", "content": instruction}]) == prompter.generate_prompt(instruction)
    assert prompt_parts(ODD_TEMPLATE) == ("Task {json} 'q' \"dq\" \\n\t", "\n", ">>> Answer:\n  ")


def test_system_message_goes_before_the_first_instruction():
    template = load_template("alpaca")
    rendered = render(template, [{"role": "system", "content": "Answer in Rust."}, {"role": "user", "content": "Sort a list."}])
    assert rendered == Prompter(template).generate_prompt("Answer in Rust.\n\nSort a list.")


def test_history_renders_as_earlier_prompts_each_answer_ended_by_eos():
    template = load_template("alpaca_short")
    prompter = Prompter(template)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add two numbers."}, {"role": "assistant", "content": "a + b"},
        {"role": "user", "content": "Now three."},
    ]
    expected = prompter.generate_prompt("Be brief.\n\nAdd two numbers.", label="a + b") + EOS + prompter.generate_prompt("Now three.")
    assert render(template, messages) == expected
    # Without the generation prompt the last turn stops before the response header.
    assert render(template, messages, add_generation_prompt=False) == expected[: -len("### Response:\n")]


def test_ollama_template_holds_the_same_text_pieces():
    template = load_template("alpaca")
    before, middle, response = prompt_parts(template)
    text = ollama_template(template, eos_token=EOS)
    assert before + '{{ $system }}{{ $system = "" }}{{ $m.Content }}' + middle in text
    assert "{{ $m.Content }}" + EOS in text and text.count(response) == 2
    assert "{{-" not in text and "-}}" not in text  # would trim the template's own newlines
    go_braces = dict(ODD_TEMPLATE, prompt_no_input="Use {{{{x}}}}: {instruction}\n>>> Answer:\n")  # renders "{{x}}"
    assert 'Use {{ "{{" }}x}}: ' in ollama_template(go_braces, eos_token=EOS)
