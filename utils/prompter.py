"""Prompt templates: build a prompt from a record, and cut the response out of generated text."""

import json
import re
from pathlib import Path

from utils.errors import CodeUpError

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = "alpaca"
REQUIRED_KEYS = ("description", "prompt_input", "prompt_no_input", "response_split")
NO_INPUT_MARKERS = ("", "<noinput>")


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


def load_template(name_or_path: str = DEFAULT_TEMPLATE) -> dict:
    """Read a template by name (templates/NAME.json) or by path to a JSON file, and check it."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise CodeUpError(
            f"unknown prompt template {name_or_path!r}: not a file, and not one of "
            f"{', '.join(available_templates())}"
        )
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CodeUpError(f"prompt template {path} is not valid JSON: {error}") from None
    missing = [key for key in REQUIRED_KEYS if key not in template]
    if missing:
        raise CodeUpError(f"prompt template {path} lacks the keys {', '.join(missing)}")
    if "{instruction}" not in template["prompt_input"] or "{input}" not in template["prompt_input"]:
        raise CodeUpError(f"prompt template {path}: prompt_input must contain {{instruction}} and {{input}}")
    if "{instruction}" not in template["prompt_no_input"]:
        raise CodeUpError(f"prompt template {path}: prompt_no_input must contain {{instruction}}")
    return template


def has_input(input_text) -> bool:
    """Code Alpaca marks a missing input as "" (older Alpaca data as "<noinput>")."""
    return input_text is not None and input_text.strip() not in NO_INPUT_MARKERS


class Prompter:
    """Builds prompts with one template and extracts the model's answer from generated text."""

    def __init__(self, template_name: str = DEFAULT_TEMPLATE):
        self.template = load_template(template_name)
        self.response_split = self.template["response_split"]
        # The section headers of the template ("### Instruction:", ...): when the model starts a
        # new section, its answer is over.
        self.section_headers = sorted(
            set(re.findall(r"^#+ [^\n{}]*:", self.template["prompt_input"], flags=re.MULTILINE))
            | {self.response_split}
        )

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The prompt for one record; with `label`, the prompt followed by the answer (for training)."""
        if has_input(input):
            prompt = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.template["prompt_no_input"].format(instruction=instruction)
        return prompt + label if label else prompt

    def get_response(self, output: str, prompt: str | None = None) -> str:
        """The answer in `output`: the text after the prompt (given, or up to the first response header),
        cut where the model starts another section of the template."""
        if prompt is not None and output.startswith(prompt):
            response = output[len(prompt):]
        elif self.response_split in output:
            response = output.split(self.response_split, 1)[1]
        else:
            response = output
        return self.response_from_continuation(response)

    def response_from_continuation(self, text: str) -> str:
        """The answer in text generated after the prompt: up to where the model starts another
        section of the template (a new "### Instruction:"), stripped."""
        cut = len(text)
        for header in self.section_headers:
            position = text.find(header)
            if position != -1:
                cut = min(cut, position)
        return text[:cut].strip()
