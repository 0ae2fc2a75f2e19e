"""Data stage: keep the instruction records of each programming language, as CodeUp did.

    python data/preprocess.py                      # the published rules (--mode codeup)
    python data/preprocess.py --mode strict        # plus stricter checks, see below

The published rules (`codeup`):
  1. read every input file (JSON list or JSONL) in order;
  2. name a record's language by the first keyword of KEYWORDS that occurs in its instruction;
  3. a record with no keyword is kept as Python when Guesslang names Python for its input or its
     output, or its output contains "def " or "import "; the others are dropped.
`strict` adds: keywords on word boundaries, Guesslang's language for the output must belong to the
family of the named language, empty outputs and exact duplicates dropped, and records sharing a long
n-gram with a benchmark dropped (decontamination: HumanEval, plus MBPP, HumanEval-X and MultiPL-E
files named with --decontaminate_with, in every language; `--decontaminate_with none` turns it off).

`--check_syntax` (on in strict mode, off unless asked in codeup mode) parses each kept record's code
(its fenced blocks, or the whole output when the output is code) as the record's language, with
Python's `ast` or a tree-sitter grammar (data/syntax.py; nothing is executed). A fragment passes when
it parses in its usual context (a Java method in a class, statements in a function, PHP without
`<?php`, ...), or as another language the instruction names or Guesslang reads in it; a syntax error
drops the record (`syntax_error`, with the parser's first error). Prose answers, and code no parser
here reads, are counted as unchecked and kept.

Writes to --output_dir: codeup_{N}k.json for N thousand records kept (codeup_{N}.json below
1,000; codeup_strict_... in strict mode), pl_raw.json,
pl_clean.json, PL_Raw.png, PL_Clean.png, unknown_pl_data.json (every dropped record with its
reason) and report.json.
"""

import contextlib
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils.eval.benchmarks import benchmark_texts, ngrams  # noqa: E402
from utils.cli import parse_list, run_cli  # noqa: E402
from utils.errors import CodeUpError  # noqa: E402
from utils.files import read_json, read_records, replacing  # noqa: E402
from syntax import check_answer  # noqa: E402

DEFAULT_DATA_PATHS = "data/code_alpaca_20k.json,data/new_codealpaca.json"

# (keyword in the instruction, language it counts as), tried in this order: the published list.
KEYWORDS = [
    ("JavaScript", "JavaScript"), ("Java", "Java"), ("shell", "shell"), ("Python", "Python"),
    ("C++", "C++/C"), ("C#", "C#"), (" C ", "C++/C"), ("Bash", "shell"), ("bash", "shell"),
    ("HTML", "HTML"), ("SQL", "SQL"), ("JSON", "JSON"), ("CSS", "CSS"), ("JSX", "JSX"),
    ("Swift", "Swift"), ("Ruby", "Ruby"), ("PHP", "PHP"), ("Go", "Go"), ("Kotlin", "Kotlin"),
    (" R ", "R"), ("MATLAB", "MATLAB"), ("TypeScript", "TypeScript"), ("Scala", "Scala"),
    ("Haskell", "Haskell"), ("Perl", "Perl"), ("Rust", "Rust"),
]
LANGUAGES = list(dict.fromkeys(language for _, language in KEYWORDS))
OTHERS = "Others"
# Strict mode: the keyword as a whole word ("Go" not inside "Good", "Java" not inside "JavaScript").
WORD_KEYWORDS = [
    (re.compile(rf"(?<![A-Za-z0-9_]){re.escape(keyword.strip())}(?![A-Za-z0-9_])"), language)
    for keyword, language in KEYWORDS
]
# Strict mode: Guesslang's names that agree with each language the instruction can name.
LANGUAGE_FAMILIES = {
    "JavaScript": ["JavaScript", "TypeScript", "CoffeeScript", "HTML"],
    "Java": ["Java"],
    "shell": ["Shell", "Batchfile", "PowerShell"],
    "Python": ["Python"],
    "C++/C": ["C", "C++", "Objective-C"],
    "C#": ["C#"],
    "HTML": ["HTML", "XML", "CSS", "JavaScript"],
    "SQL": ["SQL"],
    "JSON": ["JSON", "JavaScript"],
    "CSS": ["CSS", "HTML"],
    "JSX": ["JavaScript", "TypeScript", "HTML"],
    "Swift": ["Swift"],
    "Ruby": ["Ruby"],
    "PHP": ["PHP", "HTML"],
    "Go": ["Go"],
    "Kotlin": ["Kotlin", "Java"],
    "R": ["R"],
    "MATLAB": ["Matlab"],
    "TypeScript": ["TypeScript", "JavaScript"],
    "Scala": ["Scala"],
    "Haskell": ["Haskell"],
    "Perl": ["Perl"],
    "Rust": ["Rust"],
}
DROP_REASONS = (
    "malformed", "empty_output", "unknown_language", "language_mismatch", "duplicate", "contaminated", "syntax_error",
)
# Guesslang's names -> the filter's languages: the syntax check also tries the language Guesslang
# reads in the output (a "parse this JSON" answer is Python). HTML is left out: its grammar accepts
# almost any text, so it would pass broken code.
GUESSLANG_LANGUAGES = {
    "JavaScript": "JavaScript", "Java": "Java", "Shell": "shell", "Python": "Python", "C": "C++/C",
    "C++": "C++/C", "C#": "C#", "SQL": "SQL", "JSON": "JSON", "CSS": "CSS", "Swift": "Swift", "Ruby": "Ruby",
    "PHP": "PHP", "Go": "Go", "Kotlin": "Kotlin", "R": "R", "Matlab": "MATLAB", "TypeScript": "TypeScript",
    "Scala": "Scala", "Haskell": "Haskell", "Perl": "Perl", "Rust": "Rust",
}
SYNTAX_COUNTS = ("checked", "passed", "dropped", "unchecked")


# ---- reading -------------------------------------------------------------------------------

def parse_paths(data_paths) -> list[Path]:
    paths = [Path(path).expanduser() for path in parse_list(data_paths)]
    if not paths:
        raise CodeUpError("--data_paths names no file")
    return paths


def read_file(path: Path) -> list:
    """The records of one JSON list or JSONL file (utils/files.py's read_records); any error names
    the file (and the line). A file not named .jsonl must hold one JSON list."""
    if not path.exists():
        raise CodeUpError(f"data file not found: {path} (see data/README.md for where to get it)")
    if path.suffix == ".jsonl":
        return [record for _, record in read_records(path, what="data file")]
    # read_records reads any text that is not a JSON list as JSON Lines; here that is an error, and
    # the JSON parser's message, or what the file holds instead of a list, says which.
    with contextlib.suppress(CodeUpError):
        rows = read_records(path, what="data file")
        if rows and rows[0][0].startswith("record "):
            return [record for _, record in rows]
    records = read_json(path, what="data file")
    if not isinstance(records, list):
        raise CodeUpError(f"{path}: expected a JSON list of records (or a .jsonl file), got a {type(records).__name__}")
    return records


def read_entries(paths: list[Path]) -> tuple[list[tuple], dict[str, int]]:
    """(source, index, raw record) for every record of every file, in order, and the record count
    of each file."""
    entries, inputs = [], {}
    for path in paths:
        records = read_file(path)
        inputs[str(path)] = len(records)
        entries += [(str(path), index, raw) for index, raw in enumerate(records)]
    return entries, inputs


def count_label(count: int) -> str:
    """19,433 -> "19k" (CodeUp's names: codeup_19k.json); below 1,000 the count itself (codeup_148.json)."""
    return f"{count // 1000}k" if count >= 1000 else str(count)


def as_record(raw) -> dict | None:
    """{instruction, input, output} of a raw record, or None when it is malformed."""
    if not isinstance(raw, dict):
        return None
    fields = {"instruction": raw.get("instruction"), "input": raw.get("input", ""), "output": raw.get("output")}
    if fields["input"] is None:
        fields["input"] = ""
    if not all(isinstance(value, str) for value in fields.values()):
        return None
    return fields


# ---- the rules -----------------------------------------------------------------------------

def keyword_language(instruction: str, *, strict: bool) -> str | None:
    if strict:
        return next((language for pattern, language in WORD_KEYWORDS if pattern.search(instruction)), None)
    return next((language for keyword, language in KEYWORDS if keyword in instruction), None)


def is_python_by_default(record: dict, *, input_language: str | None, output_language: str | None) -> bool:
    """CodeUp's rule for records whose instruction names no language."""
    output = record["output"]
    return "Python" in (input_language, output_language) or "def " in output or "import " in output


def normalized_key(record: dict) -> str:
    return " ".join(f"{record['instruction']}\n{record['input']}".lower().split())


def decontamination_sources(decontaminate_with) -> list[str]:
    """HumanEval always, plus every benchmark named (MBPP, HumanEval-X, MultiPL-E files or folders);
    `none` alone turns decontamination off."""
    named = parse_list(decontaminate_with)
    if [name.lower() for name in named] == ["none"]:
        return []
    if any(name.lower() == "none" for name in named):
        raise CodeUpError("--decontaminate_with none turns decontamination off: name no benchmark beside it")
    return list(dict.fromkeys(["humaneval", *(name for name in named if name.lower() != "humaneval")]))


def benchmark_ngrams(sources, *, n: int) -> dict[tuple, str]:
    """n-gram -> the benchmark task it comes from, for the decontamination sources (prompts,
    solutions and tests, in every language); prints which benchmarks are checked."""
    index = {}
    labels = []
    for source in decontamination_sources(sources):
        label, texts = benchmark_texts(source)
        labels.append(label)
        for task_id, text in texts:
            for gram in ngrams(text, n=n):
                index.setdefault(gram, task_id)
    print("Decontamination: " + ("; ".join(labels) if labels else "off (--decontaminate_with none)"))
    return index


def load_families(language_families) -> dict[str, set[str]]:
    """The built-in families, updated from a JSON file or a dict ({"Go": ["Go", "C"]})."""
    families = dict(LANGUAGE_FAMILIES)
    if isinstance(language_families, str):
        language_families = read_json(language_families, what="language families file")
    if language_families:
        if not isinstance(language_families, dict):
            raise CodeUpError("--language_families must map a language to a list of Guesslang names")
        unknown = set(language_families) - set(LANGUAGES)
        if unknown:
            raise CodeUpError(f"--language_families names unknown languages {sorted(unknown)}; use {LANGUAGES}")
        families.update(language_families)
    return {language: set(names) for language, names in families.items()}


def filter_records(entries, *, mode, guesser, families=None, contamination=None, ngram=13, top_k=3, batch_size=64,
                   check_syntax=False, syntax_counts=None):
    """Apply the rules of `mode` to (source, index, raw) entries.

    Returns the kept records (in input order), the dropped entries with their reasons, and the
    language counts after the keyword pass (raw) and after filtering (clean). With `check_syntax`,
    the syntax check runs last on the records every other rule kept, and `syntax_counts` (a dict)
    receives checked/passed/dropped/unchecked per language.
    """
    strict = mode == "strict"
    dropped = []
    candidates = []  # (entry, record, language or None)
    for entry in entries:
        record = as_record(entry[2])  # (source, index, raw)
        if record is None:
            dropped.append(drop(entry, reason="malformed", detail="not an object with string instruction/output"))
            continue
        candidates.append((entry, record, keyword_language(record["instruction"], strict=strict)))

    raw_counts = count_languages(language for _, _, language in candidates)
    raw_counts[OTHERS] += len(dropped)  # malformed records have no language either

    # One batched Guesslang pass over every text a rule needs.
    needs_output = [strict or check_syntax or language is None for _, _, language in candidates]
    texts = {record["output"] for (_, record, _), needed in zip(candidates, needs_output) if needed}
    texts |= {record["input"] for _, record, language in candidates if language is None and record["input"].strip()}
    texts = sorted(texts)
    detections = guesser.detect(texts, top_k=top_k, batch_size=batch_size, progress=True) if texts else []
    detected = dict(zip(texts, detections))  # text -> (answer or None, top_k languages)

    kept, seen = [], set()
    for entry, record, language in candidates:
        output_language, output_top = detected.get(record["output"], (None, []))
        reason, detail = None, ""
        if strict and not record["output"].strip():
            reason = "empty_output"
        elif language is None:
            if is_python_by_default(record, input_language=detected.get(record["input"], (None,))[0],
                                    output_language=output_language):
                language = "Python"
            else:
                reason, detail = "unknown_language", f"Guesslang: output {output_language or 'not sure'}"
        if strict and reason is None:
            reason, detail = strict_reason(record, language=language, output_language=output_language,
                                           output_top=output_top, families=families, contamination=contamination,
                                           ngram=ngram, seen=seen)
        if check_syntax and reason is None:
            reason, detail = syntax_reason(record, language=language, output_language=output_language, strict=strict,
                                           counts=syntax_counts)
        if reason:
            dropped.append(drop(entry, reason=reason, detail=detail))
        else:
            kept.append((language, record))

    clean_counts = count_languages(language for language, _ in kept)
    return [record for _, record in kept], dropped, raw_counts, clean_counts


def strict_reason(record, *, language, output_language, output_top, families, contamination, ngram, seen):
    """(reason, detail) for the first strict check a kept record fails, or (None, "").

    Language agreement: Guesslang is often wrong on short snippets, so a record is a mismatch only
    when Guesslang is sure of a language outside the family and no language of the family is among
    its top_k guesses.
    """
    family = families.get(language)
    if family and output_language is not None and not family & {output_language, *output_top}:
        return "language_mismatch", (f"instruction names {language}, Guesslang says the output is "
                                     f"{output_language} (top guesses: {', '.join(output_top)})")
    key = normalized_key(record)
    if key in seen:
        return "duplicate", "same instruction and input as an earlier record"
    seen.add(key)
    if contamination:
        for field in ("instruction", "input", "output"):
            for gram in ngrams(record[field], n=ngram):
                if gram in contamination:
                    return "contaminated", f"{field} shares a {ngram}-gram with {contamination[gram]}: {' '.join(gram)}"
    return None, ""


def syntax_reason(record, *, language, output_language, strict, counts):
    """("syntax_error", the parser's first error) when the record's code does not parse, else
    (None, ""); counts the record under its language. Besides the record's language, the other
    languages its instruction names and the one Guesslang reads in the output are tried: the
    instruction's first keyword is not always the answer's language ("Parse this JSON in Python")."""
    named = [name for keyword, name in (WORD_KEYWORDS if strict else KEYWORDS)
             if (keyword.search(record["instruction"]) if strict else keyword in record["instruction"])]
    candidates = dict.fromkeys([*named, GUESSLANG_LANGUAGES.get(output_language)])
    also = tuple(name for name in candidates if name and name != language)
    status, detail = check_answer(record["output"], language=language, also=also)
    counts = {} if counts is None else counts
    tally = counts.setdefault(language, dict.fromkeys(SYNTAX_COUNTS, 0))
    if status == "unchecked":
        tally["unchecked"] += 1
        return None, ""
    tally["checked"] += 1
    tally["passed" if status == "passed" else "dropped"] += 1
    return ("syntax_error", detail) if status == "failed" else (None, "")


def drop(entry: tuple, *, reason: str, detail: str) -> dict:
    """What unknown_pl_data.json keeps of a dropped (source, index, raw record) entry: all of it."""
    source, index, raw = entry
    return {"source": source, "index": index, "reason": reason, "detail": detail, "record": raw}


def count_languages(languages) -> dict[str, int]:
    counts = dict.fromkeys(LANGUAGES + [OTHERS], 0)
    for language in languages:
        counts[language or OTHERS] += 1
    return counts


def syntax_summary(counts: dict[str, dict[str, int]]) -> str:
    """The syntax check's counts per language, one line each, for the run's summary."""
    lines = ["Syntax check (checked: parsed; unchecked: prose, or no parser for its code):"]
    for language, tally in counts.items():
        lines.append(f"  {language:<10} checked {tally['checked']:>6,}  passed {tally['passed']:>6,}  "
                     f"dropped {tally['dropped']:>5,}  unchecked {tally['unchecked']:>5,}")
    total = {key: sum(tally[key] for tally in counts.values()) for key in SYNTAX_COUNTS}
    lines.append(f"  {'total':<10} checked {total['checked']:>6,}  passed {total['passed']:>6,}  "
                 f"dropped {total['dropped']:>5,}  unchecked {total['unchecked']:>5,}")
    return "\n".join(lines)


# ---- writing -------------------------------------------------------------------------------

def radar_chart(counts: dict[str, int], *, title: str, path: Path) -> None:
    """Counts per language on a radar chart; the radius is logarithmic so that small languages show."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(counts)
    values = np.log10(1 + np.array([counts[name] for name in names], dtype=float))
    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    figure, axes = plt.subplots(figsize=(8, 8), subplot_kw={"projection": "polar"})
    axes.plot(np.append(angles, angles[0]), np.append(values, values[0]), color="tab:blue", linewidth=2)
    axes.fill(angles, values, color="tab:blue", alpha=0.25)
    axes.set_xticks(angles)
    axes.set_xticklabels([f"{name}\n{counts[name]:,}" for name in names], fontsize=8)
    top = max(1.0, float(np.ceil(values.max())))
    axes.set_yticks(range(1, int(top) + 1))
    axes.set_yticklabels([f"{10 ** k:,}" for k in range(1, int(top) + 1)], fontsize=7, color="gray")
    axes.set_ylim(0, top)
    axes.set_title(f"{title}\nradius: log scale", pad=24)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_outputs(output_dir: Path, *, files: dict[str, object]) -> None:
    """Every output filled in a temp file beside it (utils/files.py's replacing), then all renamed
    into place together: an error in any of them (a chart that fails) leaves every output as it was,
    and never a truncated file (JSON for dicts and lists, a chart for (counts, title))."""
    with contextlib.ExitStack() as staged:
        # Entered last to first: the stack exits, renaming each into place, first to last, so that
        # report.json lands last.
        temps = {name: staged.enter_context(replacing(output_dir / name)) for name in reversed(files)}
        for name, content in files.items():
            if name.endswith(".png"):
                counts, title = content
                radar_chart(counts, title=title, path=temps[name])
            else:
                temps[name].write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---- the CLI -------------------------------------------------------------------------------

def main(
    data_paths=DEFAULT_DATA_PATHS,
    output_dir: str = "data/",
    mode: str = "codeup",
    decontaminate_with="humaneval",
    ngram: int = 13,
    language_families=None,
    agreement_top_k: int = 3,
    batch_size: int = 64,
    check_syntax=None,
):
    """Filter instruction records by programming language.

    Args:
        data_paths: JSON-list or JSONL files, comma-separated or a list, read in order.
        output_dir: where the filtered data, counts, charts and report go.
        mode: `codeup` (the published rules) or `strict` (stricter, see the module docstring).
        decontaminate_with: strict mode: benchmarks checked besides HumanEval (always): MBPP, HumanEval-X
            or MultiPL-E jsonl files or folders, comma-separated; `none`: no decontamination.
        ngram: strict mode: length in whitespace tokens of the n-grams shared with a benchmark that drop a record.
        language_families: strict mode: a JSON file or dict that overrides which Guesslang languages
            agree with a named language, e.g. '{"Go": ["Go", "C"]}'.
        agreement_top_k: strict mode: the output agrees with the instruction's language when a
            language of its family is among Guesslang's top k guesses (1: Guesslang's answer only).
        batch_size: texts per Guesslang call.
        check_syntax: parse each kept record's code as its language and drop those with a syntax
            error (reason syntax_error, with the parser's first error); prose is kept. Default: on
            in strict mode, off in codeup mode (--check_syntax turns it on, --nocheck_syntax off).
    """
    started = time.time()
    check_syntax = syntax_check_wanted(mode=mode, check_syntax=check_syntax)
    paths = parse_paths(data_paths)
    families = load_families(language_families) if mode == "strict" else None
    # Everything that can fail on bad input happens before the first output is written.
    entries, inputs = read_entries(paths)
    contamination = benchmark_ngrams(decontaminate_with, n=ngram) if mode == "strict" else None
    print(f"Read {len(entries):,} records from {len(paths)} file(s); mode {mode}")

    from language_detection import Guesslang

    syntax_counts = {}
    kept, dropped, raw_counts, clean_counts = filter_records(
        entries, mode=mode, guesser=Guesslang(), families=families, contamination=contamination, ngram=ngram,
        top_k=agreement_top_k, batch_size=batch_size, check_syntax=check_syntax, syntax_counts=syntax_counts,
    )
    assert len(kept) + len(dropped) == len(entries)  # nothing is lost

    report = run_report(mode=mode, inputs=inputs, kept=kept, dropped=dropped, check_syntax=check_syntax,
                        syntax_counts=syntax_counts, started=started)
    data_file = report["output"]
    write_outputs(Path(output_dir), files={
        data_file: kept,
        "pl_raw.json": raw_counts,
        "pl_clean.json": clean_counts,
        "unknown_pl_data.json": dropped,
        "PL_Raw.png": (raw_counts, f"Languages named by the instructions ({len(entries):,} records)"),
        "PL_Clean.png": (clean_counts, f"Languages after filtering ({len(kept):,} records, {mode})"),
        "report.json": report,
    })
    dropped_by_reason = report["dropped_by_reason"]
    print(f"Kept {len(kept):,}, dropped {len(dropped):,} "
          f"({', '.join(f'{r} {n:,}' for r, n in dropped_by_reason.items() if n)}) in {report['elapsed_seconds']} s")
    if check_syntax:
        print(syntax_summary(report["syntax"]))
    print(f"Wrote {Path(output_dir) / data_file} and the counts, charts and report beside it")


def syntax_check_wanted(*, mode: str, check_syntax) -> bool:
    """--check_syntax as given, or its default for the mode (on in strict mode); a bad --mode or
    --check_syntax is refused."""
    if mode not in ("codeup", "strict"):
        raise CodeUpError(f"--mode must be codeup or strict, not {mode!r}")
    if check_syntax is None:
        check_syntax = mode == "strict"
    if not isinstance(check_syntax, bool):
        raise CodeUpError(f"--check_syntax takes True or False (or --nocheck_syntax), not {check_syntax!r}")
    return check_syntax


def run_report(*, mode: str, inputs: dict[str, int], kept: list, dropped: list, check_syntax: bool,
               syntax_counts: dict, started: float) -> dict:
    """report.json: what was read from each file, kept and dropped (by reason), the data file's
    name, the syntax check's counts per language, and the run's time so far."""
    dropped_by_reason = {reason: 0 for reason in DROP_REASONS}
    for entry in dropped:
        dropped_by_reason[entry["reason"]] += 1
    prefix = "codeup" if mode == "codeup" else "codeup_strict"
    return {
        "mode": mode, "inputs": inputs, "read": sum(inputs.values()), "kept": len(kept), "dropped": len(dropped),
        "dropped_by_reason": dropped_by_reason, "output": f"{prefix}_{count_label(len(kept))}.json",
        "check_syntax": check_syntax,
        "syntax": {language: syntax_counts[language] for language in LANGUAGES if language in syntax_counts}
        if check_syntax else None,
        "elapsed_seconds": round(time.time() - started, 2),
    }

if __name__ == "__main__":
    run_cli(main)
