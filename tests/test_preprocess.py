"""The data stage on the real Code Alpaca files (../shared/data) and on small files written here."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, SHARED_DATA

import preprocess

CODE_ALPACA = SHARED_DATA / "code_alpaca_20k.json"
NEW_CODEALPACA = SHARED_DATA / "new_codealpaca.json"
needs_shared_data = pytest.mark.skipif(not CODE_ALPACA.is_file(), reason="../shared/data is not here")

# Counts after the keyword pass on code_alpaca_20k.json + new_codealpaca.json (24,557 records).
RAW_COUNTS = {
    "JavaScript": 2393, "Java": 1842, "shell": 618, "Python": 3489, "C++/C": 1472, "C#": 292,
    "HTML": 1051, "SQL": 1772, "JSON": 206, "CSS": 356, "JSX": 2, "Swift": 63, "Ruby": 139,
    "PHP": 326, "Go": 34, "Kotlin": 4, "R": 89, "MATLAB": 13, "TypeScript": 7, "Scala": 11,
    "Haskell": 23, "Perl": 16, "Rust": 11, "Others": 10328,
}


def run_preprocess(*args):
    return subprocess.run(
        [sys.executable, "data/preprocess.py", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


def write_json(path, content):
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


@needs_shared_data
def test_raw_keyword_counts_on_the_real_files():
    records = json.loads(CODE_ALPACA.read_text()) + json.loads(NEW_CODEALPACA.read_text())
    counts = preprocess.count_languages(preprocess.keyword_language(r["instruction"], strict=False) for r in records)
    assert counts == RAW_COUNTS
    # The first keyword wins: "JavaScript" is never counted as "Java".
    assert preprocess.keyword_language("Write JavaScript, not Java", strict=False) == "JavaScript"
    assert preprocess.keyword_language("Write a bash script", strict=False) == "shell"
    assert preprocess.keyword_language("Good morning", strict=False) == "Go"  # the published rule's quirk
    assert preprocess.keyword_language("Good morning", strict=True) is None


@pytest.fixture(scope="module")
def codeup_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("codeup")
    result = run_preprocess("--data_paths", f"{CODE_ALPACA},{NEW_CODEALPACA}", "--output_dir", output_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@needs_shared_data
@pytest.mark.slow
def test_codeup_run_end_to_end(codeup_run):
    report = read_json(codeup_run / "report.json")
    assert report["inputs"] == {str(CODE_ALPACA): 20022, str(NEW_CODEALPACA): 4535}
    assert report["read"] == 24557 == report["kept"] + report["dropped"]
    assert report["kept"] == 19433 and report["output"] == "codeup_19k.json"
    assert report["dropped_by_reason"]["unknown_language"] == report["dropped"]
    assert read_json(codeup_run / "pl_raw.json") == RAW_COUNTS

    kept = read_json(codeup_run / "codeup_19k.json")
    clean = read_json(codeup_run / "pl_clean.json")
    assert len(kept) == 19433 == sum(clean.values())
    assert list(clean) == list(RAW_COUNTS) and clean["Others"] == 0
    # Only Python gains: every kept record without a keyword counts as Python.
    assert {k: v for k, v in clean.items() if k not in ("Python", "Others")} == \
        {k: v for k, v in RAW_COUNTS.items() if k not in ("Python", "Others")}
    assert clean["Python"] == RAW_COUNTS["Python"] + RAW_COUNTS["Others"] - report["dropped"]
    assert all(set(record) == {"instruction", "input", "output"} for record in kept)

    dropped = read_json(codeup_run / "unknown_pl_data.json")
    assert len(dropped) == report["dropped"]
    assert all(preprocess.keyword_language(d["record"]["instruction"], strict=False) is None for d in dropped)
    assert not any("def " in d["record"]["output"] or "import " in d["record"]["output"] for d in dropped)

    for chart in ("PL_Raw.png", "PL_Clean.png"):
        assert (codeup_run / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(codeup_run.glob(".*"))  # no temp files left


@needs_shared_data
@pytest.mark.slow
def test_kept_records_keep_the_input_order(codeup_run):
    records = json.loads(CODE_ALPACA.read_text()) + json.loads(NEW_CODEALPACA.read_text())
    kept = read_json(codeup_run / "codeup_19k.json")
    dropped_indices = {(d["source"], d["index"]) for d in read_json(codeup_run / "unknown_pl_data.json")}
    sources = [(str(CODE_ALPACA), i) for i in range(20022)] + [(str(NEW_CODEALPACA), i) for i in range(4535)]
    expected = [
        {"instruction": r["instruction"], "input": r["input"], "output": r["output"]}
        for source, r in zip(sources, records) if source not in dropped_indices
    ]
    assert kept == expected


@pytest.fixture(scope="module")
def strict_run(tmp_path_factory):
    """Strict mode on records written for this test, with one planted HumanEval prompt."""
    from utils.eval.benchmarks import load_humaneval

    folder = tmp_path_factory.mktemp("strict")
    humaneval_prompt = load_humaneval()[0]["prompt"]
    python_answer = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    records = [
        {"instruction": "Write a Python function that adds two numbers.", "input": "", "output": python_answer},
        {"instruction": "write a python function that adds  two numbers.", "input": "", "output": python_answer},
        {"instruction": "Complete this Python function.", "input": "", "output": humaneval_prompt},
        {"instruction": "Write a Python function for the docstring.", "input": humaneval_prompt, "output": python_answer},
        {"instruction": "Write a Python function that does nothing.", "input": "", "output": "   "},
        {"instruction": "Write a Java program that prints the sum of 2 and 3.", "input": "",
         "output": "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nWHERE total > 100\nGROUP BY customer_id\nORDER BY orders DESC;\n"},
        {"instruction": "Good code reads well: refactor this.", "input": "", "output": "import os\nprint(os.getcwd())\n"},
        {"instruction": "Write a SQL query for all users.", "output": "SELECT * FROM users;"},
    ]
    path = write_json(folder / "records.json", records)
    result = run_preprocess("--data_paths", path, "--output_dir", folder / "out", "--mode", "strict")
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "out"


def test_strict_mode_drops_each_planted_problem_with_its_reason(strict_run):
    report = read_json(strict_run / "report.json")
    assert report["read"] == 8 and report["kept"] == 3 and report["output"] == "codeup_strict_3.json"
    reasons = {d["index"]: d["reason"] for d in read_json(strict_run / "unknown_pl_data.json")}
    assert reasons == {1: "duplicate", 2: "contaminated", 3: "contaminated", 4: "empty_output", 5: "language_mismatch"}
    assert report["dropped_by_reason"] == {
        "malformed": 0, "empty_output": 1, "unknown_language": 0, "language_mismatch": 1,
        "duplicate": 1, "contaminated": 2, "syntax_error": 0,  # strict checks syntax: every planted answer parses
    }
    kept = read_json(strict_run / "codeup_strict_3.json")
    assert [r["instruction"][:5] for r in kept] == ["Write", "Good ", "Write"]
    assert kept[2]["input"] == ""  # a missing input means an empty one
    # "Good" names no language on word boundaries: the record is kept as Python by default.
    assert read_json(strict_run / "pl_clean.json")["Python"] == 2


def test_contaminated_records_name_the_benchmark_task(strict_run):
    details = [d["detail"] for d in read_json(strict_run / "unknown_pl_data.json") if d["reason"] == "contaminated"]
    assert len(details) == 2 and all("HumanEval/0" in detail for detail in details)


def test_malformed_records_are_dropped_and_counted(tmp_path):
    records = [
        "just a string",
        {"instruction": "Write a Python loop.", "output": None},
        {"instruction": "Write a Python loop.", "input": 3, "output": "for i in range(3): pass"},
        {"output": "no instruction"},
        {"instruction": "Write a Python loop.", "input": None, "output": "for i in range(3):\n    print(i)"},
        {"instruction": "Say hello in Python.", "input": "", "output": "print('hello')"},
    ]
    path = write_json(tmp_path / "mixed.json", records)
    result = run_preprocess("--data_paths", path, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    report = read_json(tmp_path / "out" / "report.json")
    assert report["read"] == 6 and report["kept"] == 2 and report["dropped_by_reason"]["malformed"] == 4
    dropped = read_json(tmp_path / "out" / "unknown_pl_data.json")
    assert [d["index"] for d in dropped] == [0, 1, 2, 3]
    assert dropped[0]["record"] == "just a string"  # kept verbatim for the audit


def test_jsonl_input_and_a_list_of_paths(tmp_path):
    first = tmp_path / "a.jsonl"
    first.write_text(json.dumps({"instruction": "Write Python code.", "input": "", "output": "x = 1"}) + "\n\n")
    second = write_json(tmp_path / "b.json", [{"instruction": "Write a C++ loop.", "input": "", "output": "for(;;);"}])
    result = run_preprocess("--data_paths", f"[{first},{second}]", "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_json(tmp_path / "out" / "report.json")["inputs"] == {str(first): 1, str(second): 1}


@pytest.mark.parametrize("name, content, message", [
    ("missing.json", None, "data file not found: {path}"),
    ("broken.json", '[{"instruction": "x",}]', "{path} line 1 column 22: not valid JSON (Expecting property name enclosed in double quotes)"),
    ("object.json", '{"instruction": "x"}', "{path}: expected a JSON list of records"),
    ("lines.jsonl", '{"instruction": "a", "output": "b"}\n{oops}\n', "{path} line 2: not valid JSON"),
])
def test_bad_files_fail_in_one_line_and_write_nothing(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    good = write_json(tmp_path / "good.json", [{"instruction": "Python?", "input": "", "output": "x = 1"}])
    result = run_preprocess("--data_paths", f"{good},{path}", "--output_dir", tmp_path / "out")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: " + message.format(path=path))
    assert not (tmp_path / "out").exists()


def test_outputs_appear_together_or_not_at_all(tmp_path, monkeypatch):
    out = tmp_path / "out"
    preprocess.write_outputs(out, files={"codeup_1.json": [1], "report.json": {"run": 1}})

    def broken_chart(counts, *, title, path):
        raise RuntimeError("no chart")

    monkeypatch.setattr(preprocess, "radar_chart", broken_chart)
    with pytest.raises(RuntimeError, match="no chart"):
        preprocess.write_outputs(out, files={"codeup_1.json": [2], "PL_Raw.png": ({}, "t"), "report.json": {"run": 2}})
    assert read_json(out / "codeup_1.json") == [1] and read_json(out / "report.json") == {"run": 1}
    assert sorted(path.name for path in out.iterdir()) == ["codeup_1.json", "report.json"]  # no temp file left

    renamed, rename = [], os.replace
    monkeypatch.setattr(os, "replace", lambda source, target: (renamed.append(Path(target).name), rename(source, target)))
    preprocess.write_outputs(out, files={"codeup_1.json": [3], "pl_raw.json": {}, "report.json": {"run": 3}})
    assert renamed == ["codeup_1.json", "pl_raw.json", "report.json"]  # the report lands last
    assert read_json(out / "codeup_1.json") == [3] and read_json(out / "report.json") == {"run": 3}


def test_bad_mode_and_families_are_refused(tmp_path):
    good = write_json(tmp_path / "good.json", [])
    result = run_preprocess("--data_paths", good, "--mode", "fast")
    assert result.returncode == 2 and "--mode must be codeup or strict" in result.stderr
    with pytest.raises(preprocess.CodeUpError, match="unknown languages"):
        preprocess.load_families({"Cobol": ["COBOL"]})
    assert preprocess.load_families({"Go": ["Go", "C"]})["Go"] == {"Go", "C"}


# ---- decontamination against the multilingual benchmarks ----------------------------------------

def test_named_benchmarks_add_to_humaneval_and_none_turns_it_off():
    assert preprocess.decontamination_sources("") == ["humaneval"]
    assert preprocess.decontamination_sources("a.jsonl,humaneval") == ["humaneval", "a.jsonl"]
    assert preprocess.decontamination_sources("none") == []
    with pytest.raises(preprocess.CodeUpError, match="name no benchmark beside it"):
        preprocess.decontamination_sources("none,a.jsonl")


@pytest.mark.skipif(not (SHARED_DATA / "multipl-e").is_dir(), reason="../shared/data is not here")
def test_multilingual_benchmark_files_are_recognized_by_their_fields():
    from utils.eval.benchmarks import benchmark_texts

    label, texts = benchmark_texts(str(SHARED_DATA / "humaneval-x" / "humaneval_cpp.jsonl"))
    assert label == "humaneval_cpp.jsonl (HumanEval-X, 164 problems)" and texts[0][0] == "CPP/0"
    assert "has_close_elements({1.0, 2.0, 5.9, 4.0, 5.0}, 0.95)" in texts[0][1]  # the tests count too
    label, texts = benchmark_texts(str(SHARED_DATA / "multipl-e"))
    assert label.endswith("(8 files, 1270 problems)") and "(MultiPL-E php)" in " ".join(t for t, _ in texts)


@pytest.fixture(scope="module")
def multilingual_strict_runs(tmp_path_factory):
    """Strict mode with HumanEval-X C++ and all of MultiPL-E named; then with `none`."""
    from utils.eval.benchmarks import load_humaneval
    from utils.eval.multilingual import load_problems

    folder = tmp_path_factory.mktemp("multilingual-strict")
    cpp_test = load_problems("humanevalx-cpp", str(SHARED_DATA / "humaneval-x" / "humaneval_cpp.jsonl"))[5]["tests"]
    php_tests = load_problems("multiple-php", str(SHARED_DATA / "multipl-e" / "humaneval-php-reworded.jsonl"))[0]["tests"]
    python_answer = "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"
    records = [
        {"instruction": "Write a Python function for these C++ tests.", "input": cpp_test, "output": python_answer},
        {"instruction": "Write a Python function for these PHP tests.", "input": php_tests, "output": python_answer},
        {"instruction": "Write a Python function for the docstring.", "input": load_humaneval()[0]["prompt"],
         "output": python_answer},
        {"instruction": "Write a Python function that adds two numbers.", "input": "", "output": python_answer},
    ]
    path = write_json(folder / "records.json", records)
    runs = {}
    for name, value in (("named", f"{SHARED_DATA / 'humaneval-x' / 'humaneval_cpp.jsonl'},{SHARED_DATA / 'multipl-e'}"),
                        ("none", "none")):
        result = run_preprocess("--data_paths", path, "--output_dir", folder / name, "--mode", "strict",
                                "--decontaminate_with", value)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (folder / name, result.stdout)
    return runs


@pytest.mark.skipif(not (SHARED_DATA / "multipl-e").is_dir(), reason="../shared/data is not here")
@pytest.mark.slow
def test_records_overlapping_multilingual_benchmarks_are_dropped(multilingual_strict_runs):
    out, stdout = multilingual_strict_runs["named"]
    assert "Decontamination: HumanEval (164 problems); humaneval_cpp.jsonl (HumanEval-X, 164 problems); " in stdout
    assert "multipl-e/ (8 files, 1270 problems)" in stdout
    dropped = {d["index"]: d for d in read_json(out / "unknown_pl_data.json")}
    assert {i: d["reason"] for i, d in dropped.items()} == {0: "contaminated", 1: "contaminated", 2: "contaminated"}
    assert "with CPP/" in dropped[0]["detail"] and "(MultiPL-E php)" in dropped[1]["detail"]
    assert "HumanEval/0" in dropped[2]["detail"]  # naming files added to HumanEval, did not replace it


@pytest.mark.skipif(not (SHARED_DATA / "multipl-e").is_dir(), reason="../shared/data is not here")
@pytest.mark.slow
def test_decontaminate_with_none_checks_nothing(multilingual_strict_runs):
    out, stdout = multilingual_strict_runs["none"]
    assert "Decontamination: off (--decontaminate_with none)" in stdout
    assert not [d for d in read_json(out / "unknown_pl_data.json") if d["reason"] == "contaminated"]
