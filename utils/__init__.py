"""Code shared by the CodeUp stage scripts: prompts, tokenization for training, model loading, the CLI."""

from utils.cli import run_cli
from utils.errors import CodeUpError
from utils.model_loading import (
    DEFAULT_BASE_MODEL,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_reference,
)
from utils.prompter import Prompter, available_templates, load_template
from utils.tokenization import IGNORE_INDEX, has_trainable_labels, tokenize_for_training

__all__ = [
    "DEFAULT_BASE_MODEL", "IGNORE_INDEX", "CodeUpError", "Prompter", "available_templates",
    "has_trainable_labels", "load_model", "load_model_and_tokenizer", "load_template", "load_tokenizer",
    "resolve_model_reference", "run_cli", "tokenize_for_training",
]
