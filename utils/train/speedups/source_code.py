"""Whether a model's function computes what a known one does, read from the source at run time.

transformers copies a function into each model that uses it ("Copied from", "modular" models),
so a formula this project speeds up (Llama's RMSNorm, its rotary embedding) lives in many modeling
files under many names. The check compares source text, without docstrings, comments, decorators
and blank lines, against Llama's own function in the installed transformers: a copy that changes
(or a model whose formula differs: Gemma's 1 + weight, OLMo2's order of rounding) keeps its own
code, and a new model with the same formula is covered without a list to keep up.

Llama's own function is in turn checked against the code each hand-written kernel was written and
tested against (TESTED_CODE): a transformers release that changes Llama's formula keeps the
kernel off (the run says so in one line) instead of computing the old formula for every model.
"""

import functools
import hashlib
import inspect
import re

# The sha256 (first 16 hex digits) of code_of(Llama's function), for each function a hand-written
# kernel replaces, with the transformers releases whose tests passed on it. When a release changes
# one: check the kernel against the new code, then add its hash here (`python -m utils.train.speedups.source_code`
# prints them).
TESTED_CODE = {
    "LlamaRMSNorm.forward": {"f2b1cef92c1f06bf": "5.24.0, 5.25.0"},
    "apply_rotary_pos_emb": {"c91ed95cbebf040b": "5.24.0, 5.25.0"},
    "rotate_half": {"0bbd5e99a564077f": "5.24.0, 5.25.0"},
}


def unwrapped(function):
    """The plain function behind a wrapper: functools.wraps' `__wrapped__`, or the function that a
    hub-kernel wrapper calls (with the `kernels` package installed, transformers 5.25 turns Llama's
    apply_rotary_pos_emb into an nn.Module whose forward calls the function it closes over as
    `func`)."""
    for _ in range(8):
        forward = getattr(type(function), "forward", None)
        if hasattr(function, "__wrapped__"):
            function = function.__wrapped__
        elif (not inspect.isfunction(function) and inspect.isfunction(forward)
              and "func" in forward.__code__.co_freevars):
            function = forward.__closure__[forward.__code__.co_freevars.index("func")].cell_contents
        else:
            break
    return function


@functools.cache
def _code_of(function) -> str | None:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    source = re.sub(r'""".*?"""', "", source, flags=re.S)
    lines = (line.split("#")[0].rstrip() for line in source.splitlines())
    return "\n".join(line for line in lines if line.strip() and not line.strip().startswith("@"))


def code_of(function) -> str | None:
    """function's source (unwrapped) without its docstring, comments, decorators and blank lines;
    None where there is no source to read (a builtin, a function defined at a prompt)."""
    return _code_of(unwrapped(function))


def same_code(function, reference) -> bool:
    """Whether function reads as reference (see code_of); False for anything that is not a function
    with source (including an unhashable callable, which the cache cannot hold)."""
    try:
        code = code_of(function) if callable(function) else None
    except TypeError:
        return False
    return code is not None and code == code_of(reference)


def fingerprint(function) -> str | None:
    """The first 16 hex digits of the sha256 of code_of(function); None without source."""
    try:
        code = code_of(function)
    except TypeError:
        return None
    return None if code is None else hashlib.sha256(code.encode()).hexdigest()[:16]


def untested_code(references: dict) -> str | None:
    """None where every reference function ({name in TESTED_CODE: the installed function}) reads as
    code its kernel was tested against; otherwise why not, for the run's one line."""
    import transformers

    changed = [name for name, function in references.items() if fingerprint(function) not in TESTED_CODE[name]]
    if not changed:
        return None
    return (f"transformers {transformers.__version__}'s Llama {' and '.join(changed)} is not the code it was tested "
            f"against (utils/train/speedups/source_code.py, TESTED_CODE)")


def llama_references() -> dict:
    """The installed transformers' Llama functions that TESTED_CODE names."""
    from transformers.models.llama import modeling_llama

    return {"LlamaRMSNorm.forward": modeling_llama.LlamaRMSNorm.forward,
            "apply_rotary_pos_emb": modeling_llama.apply_rotary_pos_emb, "rotate_half": modeling_llama.rotate_half}


if __name__ == "__main__":
    import transformers

    print(f"transformers {transformers.__version__}")
    for name, function in llama_references().items():
        print(f"  {name}: {fingerprint(function)}{'' if fingerprint(function) in TESTED_CODE[name] else '  (untested)'}")
