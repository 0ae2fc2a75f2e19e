"""Prompt templates: build a prompt from a record, and cut the response out of generated text."""

import re
from pathlib import Path

from utils.errors import CodeUpError
from utils.files import read_json, write_json
from utils.logs import logger

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
DEFAULT_TEMPLATE = "alpaca"
# Written by finetune.py into its output folder and every checkpoint: the template the adapter was
# trained with (name and full content), so that every later stage prompts it the same way.
TEMPLATE_RECORD = "prompt_template.json"
REQUIRED_KEYS = ("description", "prompt_input", "prompt_no_input", "response_split")
NO_INPUT_MARKERS = ("", "<noinput>")


def available_templates() -> list[str]:
    return sorted(path.stem for path in TEMPLATES_DIR.glob("*.json"))


def load_template(name_or_path: str | dict = DEFAULT_TEMPLATE) -> dict:
    """Read a template by name (templates/NAME.json) or by path to a JSON file, and check it
    (a dict is a template already read, e.g. from an adapter's record: only checked)."""
    if isinstance(name_or_path, dict):
        return check_template(name_or_path, source="the adapter's recorded template")
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = TEMPLATES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise CodeUpError(
            f"unknown prompt template {name_or_path!r}: not a file, and not one of "
            f"{', '.join(available_templates())}"
        )
    return check_template(read_json(path, what="prompt template"), source=str(path))


def check_template(template: dict, *, source: str) -> dict:
    path = source
    if not isinstance(template, dict):
        raise CodeUpError(f"prompt template {path} is not a JSON object")
    missing = [key for key in REQUIRED_KEYS if key not in template]
    if missing:
        raise CodeUpError(f"prompt template {path} lacks the keys {', '.join(missing)}")
    if "{instruction}" not in template["prompt_input"] or "{input}" not in template["prompt_input"]:
        raise CodeUpError(f"prompt template {path}: prompt_input must contain {{instruction}} and {{input}}")
    if "{instruction}" not in template["prompt_no_input"]:
        raise CodeUpError(f"prompt template {path}: prompt_no_input must contain {{instruction}}")
    return template


def save_template_record(folder, *, name: str, template: dict) -> None:
    """Record in `folder` (an adapter or checkpoint) the template it was trained with."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / TEMPLATE_RECORD, {"name": name, "template": template})


CHAT = "chat"  # the prompt format of the base tokenizer's own chat template (a name, not a file)


def read_template_record(lora_weights) -> dict | None:
    """{"name", "template"} recorded by finetune.py in an adapter folder; None for adapters from
    elsewhere (or none at all). A chat-tuned adapter's record is {"name": "chat", "template": None}:
    it was trained with the base tokenizer's own chat template."""
    if not lora_weights:
        return None
    path = Path(lora_weights).expanduser() / TEMPLATE_RECORD
    if not path.is_file():
        return None
    record = read_json(path, what="prompt-template record")
    try:
        name = record["name"]
        if name == CHAT and record["template"] is None:
            return {"name": name, "template": None}
        template = check_template(record["template"], source=str(path))
    except (KeyError, TypeError) as error:
        raise CodeUpError(f"{path}: not a prompt-template record written by finetune.py ({error})") from error
    return {"name": name, "template": template}


def resolve_prompt_template(prompt_template: str | None, lora_weights=None) -> dict | None:
    """The template to prompt a model with: the one its adapter was trained with, unless
    --prompt_template names another (allowed, with a warning: the model never saw that format);
    without a record (a base model, an adapter from elsewhere): --prompt_template or the default.
    None: the adapter was chat-tuned (record name "chat"): prompt it with the base tokenizer's own
    chat template."""
    record = read_template_record(lora_weights)
    if record is None:
        return load_template(prompt_template or DEFAULT_TEMPLATE)
    if prompt_template is None:
        return record["template"]
    chosen = load_template(prompt_template)
    if chosen != record["template"]:  # a chat record's None never equals a template
        logger.warning(
            f"{lora_weights} was trained with the prompt template {record['name']!r}; prompting it with "
            f"{prompt_template!r} instead (leave --prompt_template out to use the training template)"
        )
    return chosen


def has_input(input_text) -> bool:
    """Code Alpaca marks a missing input as "" (older Alpaca data as "<noinput>")."""
    return input_text is not None and input_text.strip() not in NO_INPUT_MARKERS


class Prompter:
    """Builds prompts with one template and extracts the model's answer from generated text."""

    def __init__(self, template_name: str | dict = DEFAULT_TEMPLATE):
        self.template = load_template(template_name)
        # The section headers of the template ("### Instruction:", ...): when the model starts a
        # new section, its answer is over.
        self.section_headers = sorted(
            set(re.findall(r"^#+ [^\n{}]*:", self.template["prompt_input"], flags=re.MULTILINE))
            | {self.template["response_split"]}
        )

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The prompt for one record; with `label`, the prompt followed by the answer (for training)."""
        if has_input(input):
            prompt = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.template["prompt_no_input"].format(instruction=instruction)
        return prompt + label if label else prompt

    def response_from_continuation(self, text: str) -> str:
        """The answer in text generated after the prompt: up to where the model starts another
        section of the template (a new "### Instruction:"), stripped."""
        cut = len(text)
        for header in self.section_headers:
            position = text.find(header)
            if position != -1:
                cut = min(cut, position)
        return text[:cut].strip()


# ---- the training prompt as a chat template (exports: transformers, llama.cpp, Ollama) ---------

INSTRUCTION_SLOT = "\x00instruction\x00"  # stands for the instruction while the template is cut up


def prompt_parts(template: dict) -> tuple[str, str, str]:
    """The no-input prompt cut into (before the instruction, after it up to the response header,
    the response header onwards): the last part is what add_generation_prompt adds. A template
    whose response header does not follow the instruction keeps everything after it in the middle
    part (the generation prompt is then empty)."""
    prompt = template["prompt_no_input"].format(instruction=INSTRUCTION_SLOT)
    before, after = prompt.split(INSTRUCTION_SLOT, 1)
    split = after.rfind(template["response_split"])
    if split == -1:
        return before, after, ""
    return before, after[:split], after[split:]


def jinja_string(text: str) -> str:
    """A Jinja string literal for text (Jinja2 and llama.cpp's engine both read these escapes)."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    return f"'{escaped}'"


def chat_template(template: dict) -> str:
    """A Jinja chat template (Hugging Face's apply_chat_template, llama.cpp, llama-cpp-python) that
    renders a conversation in the training prompt:

    - one user message with add_generation_prompt=True renders exactly the no-input prompt the
      model was trained on, e.g. Alpaca's "Below is an instruction ... ### Instruction:\n{it}\n\n
      ### Response:\n";
    - a system message (anywhere; the last one counts) is put before the first user message's
      text, followed by a blank line: it becomes part of the instruction, the only place the
      training format has for it;
    - a multi-turn history renders as earlier prompts each followed by its answer and EOS (as every
      training example ended), then the new prompt: user -> the prompt without the response header,
      assistant -> the response header, the answer, EOS;
    - add_generation_prompt=True adds the response header after a final user message.
    No BOS: the tokenizer adds it when the model has one, as in training."""
    before, middle, response = prompt_parts(template)
    return (
        "{%- set ns = namespace(system='') -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}"
        f"{{{{ {jinja_string(before)} + ns.system + message['content'] + {jinja_string(middle)} }}}}"
        "{%- set ns.system = '' -%}"
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {jinja_string(response)} + message['content'] + eos_token }}}}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {jinja_string(response)} }}}}{{%- endif -%}}"
    )


def ollama_template(template: dict, *, eos_token: str) -> str:
    """The same rendering as chat_template, as an Ollama (Go text/template) TEMPLATE: the last
    system message before the first user turn, each answer ended by EOS (eos_token: its text), and the response header after the last user turn."""
    before, middle, response = prompt_parts(template)
    literal = lambda text: text.replace("{{", '{{ "{{" }}')  # noqa: E731  (Go text is literal but for {{)
    # No {{- / -}} anywhere: they would trim the template's own newlines next to them.
    return (
        '{{ $system := "" }}{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = printf "%s\\n\\n" .Content }}{{ end }}{{ end }}'
        '{{ range $i, $m := .Messages }}'
        '{{ if eq $m.Role "user" }}' + literal(before) + '{{ $system }}{{ $system = "" }}{{ $m.Content }}' + literal(middle)
        + '{{ if eq (len (slice $.Messages $i)) 1 }}' + literal(response) + '{{ end }}'
        + '{{ else if eq $m.Role "assistant" }}' + literal(response) + '{{ $m.Content }}' + literal(eos_token)
        + '{{ end }}{{ end }}'
    )
