"""Chat-format data: Alpaca, OpenAI `messages` and ShareGPT `conversations` records, rendered with
the base tokenizer's own chat template, tokenized with the loss on assistant turns only. Chat text
is tokenized without added special tokens, in training and generation alike (the template has them).

`--prompt_template chat` (finetune.py, generate.py, evaluate.py) means "the base tokenizer's chat
template"; the adapter records {"name": "chat", "template": null}, and every later stage renders
its prompts with that tokenizer's template again. A base without a chat template gets ChatML (the
format TRL's setup_chat_format adds), the same one at training and at generation.
"""

from pathlib import Path

from utils.errors import CodeUpError
from utils.files import NOT_JSON, read_records
from utils.logs import logger
from utils.prompter import CHAT, has_input, load_template, read_template_record, resolve_prompt_template
from utils.tokenization import IGNORE_INDEX

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class BadRecord(ValueError):
    """A record that cannot become a conversation (the message says why)."""


# ---- which prompt format a model is talked to in --------------------------------------------

def recorded_template_name(lora_weights) -> str | None:
    """The template name an adapter's prompt_template.json records (None: no record)."""
    record = read_template_record(lora_weights)
    return record["name"] if record else None


def resolve_prompt_format(prompt_template: str | None, lora_weights=None):
    """CHAT (the base tokenizer's chat template) or a template dict, as resolve_prompt_template
    decides for instruction templates: the adapter's record unless --prompt_template names another."""
    recorded = recorded_template_name(lora_weights)
    if prompt_template == CHAT or (prompt_template is None and recorded == CHAT):
        if prompt_template == CHAT and recorded not in (None, CHAT):
            logger.warning(f"{lora_weights} was trained with the prompt template {recorded!r}; prompting it "
                           f"with the base's chat template instead (leave --prompt_template out to use the training template)")
        return CHAT
    if recorded == CHAT:  # an instruction template for a chat-tuned adapter
        logger.warning(f"{lora_weights} was trained with the base's chat template; prompting it with "
                       f"{prompt_template!r} instead (leave --prompt_template out to use the training template)")
        return load_template(prompt_template)
    return resolve_prompt_template(prompt_template, lora_weights=lora_weights)


def chat_template_of(tokenizer) -> str:
    """The tokenizer's own chat template, else ChatML (one rule for training and generation)."""
    return tokenizer.chat_template or CHATML_TEMPLATE


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template_of(tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def user_message(instruction: str, input: str | None = None) -> dict:
    """An Alpaca record's prompt as one user message: the instruction, then its input."""
    content = f"{instruction}\n\n{input}" if has_input(input) else instruction
    return {"role": "user", "content": content}


class ChatPrompter:
    """Prompter's interface for chat-tuned models: prompts are the base tokenizer's chat template;
    the answer ends at the template's end-of-turn token (EOS), so nothing is cut from it."""

    name = CHAT

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Stop strings, as for instruction templates: none when the end of turn is EOS; ChatML's
        # end-of-turn text for a base without a chat template (there it is plain text).
        self.section_headers = [] if tokenizer.chat_template else ["<|im_end|>"]
        if not tokenizer.chat_template:
            logger.warning("the base tokenizer has no chat template: using ChatML")

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        prompt = render_chat(tokenizer=self.tokenizer, messages=[user_message(instruction, input)], add_generation_prompt=True)
        return prompt + label if label else prompt

    def chat_prompt(self, messages: list[dict]) -> str:
        return render_chat(tokenizer=self.tokenizer, messages=messages, add_generation_prompt=True)

    def response_from_continuation(self, text: str) -> str:
        for header in self.section_headers:
            text = text.split(header, 1)[0]
        return text.strip()


# ---- records ---------------------------------------------------------------------------------

def record_to_messages(record) -> list[dict]:
    """Any supported record as a list of {"role", "content"} messages; BadRecord if it cannot be one."""
    if record is NOT_JSON:
        raise BadRecord("not valid JSON")
    if not isinstance(record, dict):
        raise BadRecord("not a JSON object")
    if "messages" in record:
        messages = [_message(m, role_key="role", content_key="content", roles={r: r for r in ROLES})
                    for m in _turns(record["messages"], "messages")]
    elif "conversations" in record:
        messages = [_message(m, role_key="from", content_key="value", roles=SHAREGPT_ROLES)
                    for m in _turns(record["conversations"], "conversations")]
    elif "instruction" in record and "output" in record:
        instruction, input, output = record["instruction"], record.get("input"), record["output"]
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(input, (str, type(None))):
            raise BadRecord("instruction, input and output must be strings")
        messages = [user_message(instruction, input), {"role": "assistant", "content": output}]
    else:
        raise BadRecord("neither instruction/output, messages nor conversations")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("no assistant turn")
    if messages[0]["role"] == "assistant" or (messages[0]["role"] == "system" and messages[1:2] and messages[1]["role"] != "user"):
        raise BadRecord("the conversation must start with a user turn (after an optional system message)")
    return messages


def _turns(turns, key):
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"empty conversation ({key})")
    return turns


def _message(message, *, role_key, content_key, roles):
    if not isinstance(message, dict) or not isinstance(message.get(content_key), str):
        raise BadRecord(f"a turn without a {content_key!r} string")
    role = roles.get(message.get(role_key))
    if role is None:
        raise BadRecord(f"unknown role {message.get(role_key)!r}")
    return {"role": role, "content": message[content_key]}


def read_conversations(paths: list[Path]) -> tuple[list[list[dict]], list[str]]:
    """Conversations from JSON / JSONL files (records of any supported format, mixed), and one
    "file line N: why" problem per record skipped."""
    conversations, problems = [], []
    for path in paths:
        for where, record in read_records(path, what="--data_path", bad_lines="keep"):
            try:
                conversations.append(record_to_messages(record))
            except BadRecord as error:
                problems.append(f"{path} {where}: {error}")
    return conversations, problems


# ---- tokenization ------------------------------------------------------------------------------

def tokenize_conversation(tokenizer, messages: list[dict], cutoff_len: int = 512, train_on_inputs: bool = False) -> dict:
    """Token ids and labels of a whole conversation in the chat template; labels are IGNORE_INDEX
    outside assistant turns (train_on_inputs: everywhere a label).

    The template's text is cut into segments at each assistant turn: the prompt before it (what
    the template renders with add_generation_prompt) and its answer (what the turn adds, its
    end-of-turn marker included); a label never covers a prompt token. Past cutoff_len the conversation ends after the last whole assistant
    turn that fits, so no label is left without the prompt it answers (only a first answer longer
    than cutoff_len is cut inside, its whole prompt kept when that fits)."""
    template = chat_template_of(tokenizer)
    render = lambda turns, prompt: tokenizer.apply_chat_template(
        turns, chat_template=template, tokenize=False, add_generation_prompt=prompt)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    input_ids, labels, turn_ends, rendered = [], [], [], ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt_text, full_text = render(messages[:index], True), render(messages[:index + 1], False)
        if not prompt_text.startswith(rendered) or not full_text.startswith(prompt_text):
            raise BadRecord("the chat template renders earlier turns differently once later ones follow")
        # Tokens as the whole text tokenizes (what generation sees); where a merge crosses a
        # boundary (or a tokenizer adds a prefix space), each segment is tokenized on its own.
        prompt_all, full_all = encode(prompt_text), encode(full_text)
        if prompt_all[:len(input_ids)] == input_ids and full_all[:len(prompt_all)] == prompt_all:
            prompt_ids, answer_ids = prompt_all[len(input_ids):], full_all[len(prompt_all):]
        else:
            prompt_ids, answer_ids = encode(prompt_text[len(rendered):]), encode(full_text[len(prompt_text):])
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
        turn_ends.append(len(input_ids))
        rendered = full_text
    if train_on_inputs:
        labels = list(input_ids)
    if len(input_ids) > cutoff_len:
        whole = [end for end in turn_ends if end <= cutoff_len]
        cut = whole[-1] if whole else cutoff_len  # the first answer alone is too long: cut inside it
        input_ids, labels = input_ids[:cut], labels[:cut]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


# ---- finetune.py's hooks ------------------------------------------------------------------------

MAX_PROBLEMS_SHOWN = 5


def load_chat_records(data_path):
    """Every record of --data_path (a file, a comma-separated list of files, or a hub dataset id)
    as a datasets.Dataset with one "messages" column; bad records are skipped, counted and reported
    with their file and line."""
    from datasets import Dataset, load_dataset

    from utils.cli import parse_list

    names = parse_list(data_path) if isinstance(data_path, (list, tuple)) or "," in str(data_path) else [str(data_path)]
    paths = [Path(name).expanduser() for name in names]
    conversations, problems = [], []
    for name, path in zip(names, paths):
        if path.is_file():
            found, bad = read_conversations([path])
        elif path.suffix in (".json", ".jsonl") or path.exists():
            raise CodeUpError(f"data file not found: {path} (run data/preprocess.py, or pass --data_path)")
        else:
            try:
                rows = load_dataset(name, split="train")
            except Exception as error:  # datasets raises many kinds; all mean "cannot read this data"
                raise CodeUpError(f"cannot read --data_path {name}: {str(error).splitlines()[0]}") from error
            found, bad = [], []
            for number, row in enumerate(rows, start=1):
                try:
                    found.append(record_to_messages(row))
                except BadRecord as error:
                    bad.append(f"{name} record {number}: {error}")
        conversations += found
        problems += bad
    if problems:
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN]) + ("; ..." if len(problems) > MAX_PROBLEMS_SHOWN else "")
        logger.warning(f"{len(problems)} record(s) skipped: {shown}")
    if not conversations:
        raise CodeUpError(f"{data_path}: no usable record (of {len(problems)})")
    return Dataset.from_list([{"messages": messages} for messages in conversations])


def chat_tokenizer_function(tokenizer, *, cutoff_len: int, train_on_inputs: bool):
    """The datasets.map function for chat records (finetune.py --prompt_template chat)."""
    def tokenize(record):
        return tokenize_conversation(tokenizer=tokenizer, messages=record["messages"], cutoff_len=cutoff_len, train_on_inputs=train_on_inputs)
    return tokenize
