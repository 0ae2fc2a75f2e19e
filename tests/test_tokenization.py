import pytest

from utils.model_loading import load_tokenizer
from utils.prompter import Prompter
from utils.tokenization import IGNORE_INDEX, has_trainable_labels, tokenize_for_training

INSTRUCTION = "Write a Python function that returns the sum of a list of numbers."
RESPONSE = "def total(numbers):\n    return sum(numbers)"


@pytest.fixture(scope="module", params=["tiny_llama_dir", "smollm2_dir"])
def tokenizer(request):
    return load_tokenizer(str(request.getfixturevalue(request.param)))


def encode(tokenizer, instruction=INSTRUCTION, input=None, response=RESPONSE, template="alpaca", **options):
    prompt = Prompter(template).generate_prompt(instruction, input)
    return prompt, tokenize_for_training(tokenizer, prompt, response, **options)


def test_prompt_is_masked_exactly_at_the_boundary(tokenizer):
    prompt, example = encode(tokenizer)
    prompt_ids = tokenizer(prompt)["input_ids"]
    n = len(prompt_ids)
    assert example["input_ids"][:n] == prompt_ids  # what generation will see
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n:] == example["input_ids"][n:]
    assert IGNORE_INDEX not in example["labels"][n:]
    assert len(example["input_ids"]) == len(example["labels"]) == len(example["attention_mask"])


def test_response_labels_decode_to_the_response_and_end_with_eos(tokenizer):
    prompt, example = encode(tokenizer)
    response_labels = [label for label in example["labels"] if label != IGNORE_INDEX]
    assert response_labels[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(response_labels[:-1]).strip() == RESPONSE


def test_train_on_inputs_learns_the_prompt_too(tokenizer):
    _, example = encode(tokenizer, train_on_inputs=True)
    assert example["labels"] == example["input_ids"]
    assert example["labels"][-1] == tokenizer.eos_token_id


def test_add_eos_token_false_adds_none(tokenizer):
    _, example = encode(tokenizer, add_eos_token=False)
    assert tokenizer.eos_token_id not in example["input_ids"]


def test_pad_token_is_not_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_empty_input_field_matches_no_input_prompt(tokenizer):
    _, with_empty = encode(tokenizer, input="")
    _, without = encode(tokenizer, input=None)
    assert with_empty == without


def test_unicode_round_trips(tokenizer):
    response = "print('héllo, 世界 🐍')  # ñ"
    _, example = encode(tokenizer, instruction="Print a greeting in 日本語 and emoji 🎉", response=response)
    response_labels = [label for label in example["labels"] if label != IGNORE_INDEX][:-1]
    assert tokenizer.decode(response_labels).strip() == response


def test_truncation_keeps_ids_and_labels_aligned_and_drops_eos(tokenizer):
    long_response = "\n".join(f"x_{i} = {i} * {i}" for i in range(200))
    prompt, full = encode(tokenizer, response=long_response, cutoff_len=4096)
    assert len(full["input_ids"]) > 64
    _, cut = encode(tokenizer, response=long_response, cutoff_len=64)
    assert len(cut["input_ids"]) == len(cut["labels"]) == len(cut["attention_mask"]) == 64
    assert cut["input_ids"] == full["input_ids"][:64]
    assert cut["labels"] == full["labels"][:64]
    assert cut["input_ids"][-1] != tokenizer.eos_token_id


def test_eos_is_a_label_when_the_example_exactly_fits(tokenizer):
    _, full = encode(tokenizer)
    exact = len(full["input_ids"])
    _, fits = encode(tokenizer, cutoff_len=exact)
    assert fits == full and fits["labels"][-1] == tokenizer.eos_token_id
    _, one_short = encode(tokenizer, cutoff_len=exact - 1)
    assert tokenizer.eos_token_id not in one_short["labels"]


def test_prompt_longer_than_cutoff_has_no_trainable_label(tokenizer):
    _, example = encode(tokenizer, input="context " * 300, cutoff_len=32)
    assert len(example["input_ids"]) == 32
    assert not has_trainable_labels(example)
    _, with_inputs = encode(tokenizer, input="context " * 300, cutoff_len=32, train_on_inputs=True)
    assert has_trainable_labels(with_inputs)


def test_legacy_template_boundary_keeps_the_prompt_tokens(tokenizer):
    # The legacy prompt ends in "### Response:" with the answer glued on: tokenized as one text, the
    # colon may merge with the answer's first characters. The prompt must still be the prompt alone.
    prompt, example = encode(tokenizer, template="alpaca_legacy", response=":=:: walrus")
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"][: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response_labels = [label for label in example["labels"] if label != IGNORE_INDEX][:-1]
    assert tokenizer.decode(response_labels).strip() == ":=:: walrus"
