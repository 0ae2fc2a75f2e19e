"""Tokenization for supervised fine-tuning: prompt + response + EOS, with the prompt masked out of the loss."""

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


def tokenize_for_training(
    tokenizer,
    prompt: str,
    response: str,
    *,
    cutoff_len: int = 512,
    train_on_inputs: bool = False,
    add_eos_token: bool = True,
) -> dict:
    """Token ids, attention mask and labels for one example.

    The prompt's tokens are exactly those that generation will see (the prompt tokenized alone), so
    the prompt/response boundary is exact: when tokenizing prompt+response as one text merges tokens
    across the boundary, the response is tokenized on its own instead. With train_on_inputs=False
    the prompt's labels are IGNORE_INDEX. Examples longer than cutoff_len are truncated (ids and
    labels together); EOS is added, and is a label, whenever the example fits.
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + response, add_special_tokens=True)["input_ids"]
    if full_ids[: len(prompt_ids)] == prompt_ids:
        response_ids = full_ids[len(prompt_ids):]
    else:
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if add_eos_token and tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]

    input_ids = (prompt_ids + response_ids)[:cutoff_len]
    if train_on_inputs:
        labels = list(input_ids)
    else:
        labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:cutoff_len]
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids), "labels": labels}


def has_trainable_labels(example: dict) -> bool:
    """False when truncation left no label to learn (a prompt longer than cutoff_len): such an
    example only costs compute, and a batch of them gives a NaN loss."""
    return any(label != IGNORE_INDEX for label in example["labels"])
