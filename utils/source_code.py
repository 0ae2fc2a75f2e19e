"""Whether a model's function computes what a known one does, read from the source at run time.

transformers copies a function into each model that uses it ("Copied from", "modular" models),
so a formula this project speeds up (Llama's RMSNorm, its rotary embedding) lives in many modeling
files under many names. The check compares source text, without docstrings, comments, decorators
and blank lines, against Llama's own function in the installed transformers: a copy that changes
(or a model whose formula differs: Gemma's 1 + weight, OLMo2's order of rounding) keeps its own
code, and a new model with the same formula is covered without a list to keep up.
"""

import functools
import inspect
import re


@functools.cache
def code_of(function) -> str | None:
    """function's source without its docstring, comments, decorators and blank lines; None where
    there is no source to read (a builtin, a function defined at a prompt)."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    source = re.sub(r'""".*?"""', "", source, flags=re.S)
    lines = (line.split("#")[0].rstrip() for line in source.splitlines())
    return "\n".join(line for line in lines if line.strip() and not line.strip().startswith("@"))


def same_code(function, reference) -> bool:
    """Whether function reads as reference (see code_of); False for anything that is not a function
    with source (including an unhashable callable, which the cache cannot hold)."""
    try:
        code = code_of(function) if callable(function) else None
    except TypeError:
        return False
    return code is not None and code == code_of(reference)
