"""The data stage's syntax check: data/syntax.py on its own, then through preprocess.py --check_syntax."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT
import syntax

import preprocess

# (language, valid answer, broken answer, what the parser's first error says about the broken one).
# The valid ones are the fragments Code Alpaca answers with: no class around a Java method, no
# includes before a C++ function, no package clause in Go, no `<?php` in PHP, a bare SQL statement.
CASES = [
    ("Python", "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
     "def add(a, b):\nreturn a + b", "line 2: expected an indented block"),
    ("JavaScript", "const add = (a, b) => a + b;\nconsole.log(add(2, 3));",
     "function add(a, b) {\n  return a + b;\n\nconsole.log(add(2, 3));", "line "),
    ("Java", "public int add(int a, int b) {\n    return a + b;\n}",
     "public int add(int a, int b) {\n    return a + b\n}", "line 2"),
    ("C++/C", "int add(int a, int b) {\n    std::cout << a + b << std::endl;\n    return a + b;\n}",
     "int add(int a, int b) {\n    return a + b;\n", "expected '}'"),
    ("Go", "func add(a int, b int) int {\n\treturn a + b\n}",
     "func add(a int, b int) int {\n\treturn a +\n}", "line "),
    ("Rust", "fn add(a: i32, b: i32) -> i32 {\n    a + b\n}",
     "fn add(a: i32, b: i32) -> i32 {\n    let c = a + ;\n    c\n}", "line 2"),
    ("shell", "#!/bin/bash\nfor f in *.txt; do\n  echo \"$f\"\ndone",
     "#!/bin/bash\nfor f in *.txt; do\n  echo \"$f\"\n", "line "),
    ("SQL", "SELECT name, COUNT(*) AS orders\nFROM customers\nWHERE age > 30\nGROUP BY name",
     "SELECT name FROM customers WHERE age > AND city = 'Paris';", "line 1"),
    ("PHP", "function add($a, $b) {\n    return $a + $b;\n}\necho add(2, 3);",
     "function add($a, $b) {\n    return $a + $b;\n}\necho add(2, 3", "line 4"),
]


@pytest.mark.parametrize("language, valid, broken, message", CASES, ids=[case[0] for case in CASES])
def test_valid_fragments_pass_and_broken_code_fails_with_the_parsers_error(language, valid, broken, message):
    assert syntax.syntax_error(valid, language=language) is None
    error = syntax.syntax_error(broken, language=language)
    assert error is not None and message in error
    assert error.startswith("line ")
    assert syntax.check_answer(valid, language=language) == ("passed", "")
    status, detail = syntax.check_answer(broken, language=language)
    assert status == "failed" and detail.startswith(f"{language} parser: line ")


def test_fragments_parse_in_their_usual_context():
    # Statements without a function around them, in languages that need one.
    assert syntax.syntax_error("int x = 5;\nSystem.out.println(x);", language="Java") is None
    assert syntax.syntax_error("for (int i = 0; i < 3; i++) {\n  printf(\"%d\", i);\n}", language="C++/C") is None
    assert syntax.syntax_error("x := 5\nfmt.Println(x)", language="Go") is None
    assert syntax.syntax_error("let v = vec![1, 2];\nprintln!(\"{:?}\", v);", language="Rust") is None
    # A JS object literal is an expression, not a block; a method is a class member.
    assert syntax.syntax_error('{\n  "name": "John",\n  "age": 30\n}', language="JavaScript") is None
    assert syntax.syntax_error("getName() {\n  return this.name;\n}", language="JavaScript") is None
    # A Python method copied out of its class keeps the class's indentation.
    assert syntax.syntax_error("    def area(self):\n        return self.w * self.h", language="Python") is None
    # CSS declarations without their selector; PHP with its opening tag as well as without.
    assert syntax.syntax_error("color: red;\nmargin: 0 auto;", language="CSS") is None
    assert syntax.syntax_error("<?php\necho 'hi';\n?>", language="PHP") is None


def test_the_wrapping_does_not_hide_a_real_error():
    # Each wrapping is tried, none parses this: the error is the one of the code as written.
    error = syntax.syntax_error("public void run() {\n    int x = ;\n}", language="Java")
    assert error is not None and error.startswith("line 2")


def test_sql_dialect_spellings_pass_and_procedures_are_unchecked():
    for query in ("SELECT TOP 10 salary FROM employees ORDER BY salary DESC;",
                  "SELECT * FROM orders WHERE day > NOW() - INTERVAL 30 DAY;",
                  "SELECT salary FROM employee ORDER BY salary DESC LIMIT 2,1;",
                  "SELECT COUNT(*) AS 'Number of Orders' FROM orders;"):
        assert syntax.syntax_error(query, language="SQL") is None, query
    procedure = "CREATE PROCEDURE count_rows AS\nBEGIN\n  SELECT COUNT(*) FROM t;\nEND"
    assert not syntax.checkable(procedure, language="SQL")
    assert syntax.check_answer(procedure, language="SQL") == ("unchecked", "no parser for its code")


def test_another_named_language_can_pass_the_code():
    # "Write a SQL query in PHP": the first keyword is SQL, the answer is PHP.
    php = "$result = mysqli_query($conn, \"SELECT * FROM users\");\nwhile ($row = mysqli_fetch_assoc($result)) {\n  echo $row['name'];\n}"
    assert syntax.syntax_error(php, language="SQL") is not None
    assert syntax.syntax_error(php, language="SQL", also=("PHP",)) is None
    # A CSS answer that is an HTML page with its <style> passes as HTML (a related language).
    assert syntax.syntax_error("<style>\n  p { color: red; }\n</style>\n<p>Hi</p>", language="CSS") is None


def test_prose_is_never_checked():
    for prose in ("The yield keyword in Python turns a function into a generator.",
                  "A list is mutable; a tuple is not. Use a tuple for fixed records.",
                  "Hello World",
                  "[5, 4, 3, 2, 1]"):
        assert syntax.code_blocks(prose, language="Python") == [], prose
        assert syntax.check_answer(prose, language="Python") == ("unchecked", "no code")
    # Prose mixed with code outside fences is not parsed as a whole either.
    mixed = "You can use a loop:\nfor i in range(3):\n    print(i)\nThis prints the numbers 0 to 2."
    assert syntax.check_answer(mixed, language="Python")[0] == "unchecked"


def test_fenced_blocks_are_checked_each_in_its_language():
    answer = ("Here is the function:\n```python\ndef f(x):\n    return x * 2\n```\n"
              "And the query:\n```sql\nSELECT * FROM t WHERE\n```\n")
    assert [language for language, _ in syntax.code_blocks(answer, language="Python")] == ["Python", "SQL"]
    status, detail = syntax.check_answer(answer, language="Python")
    assert status == "failed" and detail.startswith("SQL parser: block 2, line ")
    good = "Use this:\n```\ndef f(x):\n    return x * 2\n```\nIt doubles x."
    assert syntax.check_answer(good, language="Python") == ("passed", "")
    # A block labelled with a language no parser here reads is left alone.
    assert syntax.check_answer("```text\nnot code at all (\n```", language="Python") == ("unchecked", "no parser for its code")


def test_languages_without_a_grammar_are_unchecked():
    assert not syntax.has_grammar(language="Cobol")
    assert syntax.check_answer("x = 1;", language="Cobol") == ("unchecked", "no parser for its code")
    with pytest.raises(KeyError):
        syntax.syntax_error("x = 1", language="Cobol")
    # Every language of the filter has a grammar here.
    assert all(syntax.has_grammar(language=language) for language in preprocess.LANGUAGES)


def test_the_error_detail_names_line_and_what_was_found_or_expected():
    assert syntax.syntax_error("int f() {\n  return 1;\n", language="C++/C") == "line 2, column 12: expected '}'"
    error = syntax.syntax_error("SELECT * FROM t WHERE x = = 1;", language="SQL")
    assert error.startswith("line 1, column ") and "unexpected" in error


# ---- through preprocess.py ------------------------------------------------------------------

def run_preprocess(*args):
    return subprocess.run(
        [sys.executable, "data/preprocess.py", *map(str, args)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )


RECORDS = [
    {"instruction": "Write a Python function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b"},
    {"instruction": "Write a Python class for a telephone directory.", "input": "",  # lost its indentation
     "output": "class Directory:\ndef __init__(self):\nself.entries = {}\ndef add(self, name, number):\nself.entries[name] = number"},
    {"instruction": "Write a Java method that returns the maximum of two integers.", "input": "",
     "output": "public static int max(int a, int b) {\n    return a > b ? a : b;\n}"},
    {"instruction": "Write a SQL query that selects every user older than 30.", "input": "",
     "output": "SELECT * FROM users WHERE age > 30 AND;"},
    {"instruction": "Explain what a Python decorator is.", "input": "",
     "output": "A decorator is a function that takes another function and returns a new one. It is applied with @name."},
    {"instruction": "Write a Haskell function that doubles a number.", "input": "", "output": "double x = x * 2"},
]


@pytest.fixture(scope="module")
def syntax_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("syntax")
    path = folder / "records.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    runs = {}
    for name, args in (("codeup_on", ["--check_syntax"]), ("codeup_off", []), ("strict", ["--mode", "strict"])):
        result = run_preprocess("--data_paths", path, "--output_dir", folder / name, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = (folder / name, result.stdout)
    return runs


@pytest.mark.slow
def test_check_syntax_drops_broken_records_with_the_parsers_error(syntax_runs):
    out, stdout = syntax_runs["codeup_on"]
    report = json.loads((out / "report.json").read_text())
    assert report["check_syntax"] is True
    assert report["read"] == 6 and report["kept"] == 4 and report["dropped_by_reason"]["syntax_error"] == 2
    dropped = json.loads((out / "unknown_pl_data.json").read_text())
    assert [(d["index"], d["reason"]) for d in dropped] == [(1, "syntax_error"), (3, "syntax_error")]
    assert dropped[0]["detail"] == "Python parser: line 2: expected an indented block after class definition on line 1"
    assert dropped[1]["detail"].startswith("SQL parser: line 1, column ")
    kept = json.loads((out / "codeup_4.json").read_text())
    assert [r["instruction"][:12] for r in kept] == ["Write a Pyth", "Write a Java", "Explain what", "Write a Hask"]
    # checked / passed / dropped / unchecked per language; prose is unchecked and kept.
    assert report["syntax"] == {
        "Java": {"checked": 1, "passed": 1, "dropped": 0, "unchecked": 0},
        "Python": {"checked": 2, "passed": 1, "dropped": 1, "unchecked": 1},
        "SQL": {"checked": 1, "passed": 0, "dropped": 1, "unchecked": 0},
        "Haskell": {"checked": 1, "passed": 1, "dropped": 0, "unchecked": 0},
    }
    assert "Syntax check" in stdout and "Python     checked      2  passed      1  dropped     1  unchecked     1" in stdout


@pytest.mark.slow
def test_codeup_mode_checks_nothing_unless_asked(syntax_runs):
    out, stdout = syntax_runs["codeup_off"]
    report = json.loads((out / "report.json").read_text())
    assert report["check_syntax"] is False and report["syntax"] is None
    assert report["kept"] == 6 and report["dropped_by_reason"]["syntax_error"] == 0
    assert "Syntax check" not in stdout


def test_a_bad_check_syntax_value_is_one_error_line(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps(RECORDS[:1]), encoding="utf-8")
    result = run_preprocess("--data_paths", path, "--output_dir", tmp_path / "out", "--check_syntax", "maybe")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: --check_syntax takes True or False (or --nocheck_syntax), not 'maybe'"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_strict_mode_checks_syntax_by_default(syntax_runs):
    out, stdout = syntax_runs["strict"]
    report = json.loads((out / "report.json").read_text())
    assert report["check_syntax"] is True and "Syntax check" in stdout
    assert report["dropped_by_reason"]["syntax_error"] >= 1
    assert {d["index"] for d in json.loads((out / "unknown_pl_data.json").read_text()) if d["reason"] == "syntax_error"} <= {1, 3}


def test_filter_records_counts_per_language():
    class NoGuess:  # Guesslang is not sure of anything: only the keyword names the language
        def detect(self, texts, **_):
            return [(None, []) for _ in texts]

    entries = [("f", i, record) for i, record in enumerate(RECORDS)]
    counts = {}
    kept, dropped, _, clean = preprocess.filter_records(
        entries, mode="strict", guesser=NoGuess(), families=preprocess.load_families(None), contamination=None,
        check_syntax=True, syntax_counts=counts,
    )
    assert [d["index"] for d in dropped if d["reason"] == "syntax_error"] == [1, 3]
    assert len(kept) == 4 and clean["Python"] == 2 and clean["SQL"] == 0
    assert counts["Python"] == {"checked": 2, "passed": 1, "dropped": 1, "unchecked": 1}
    summary = preprocess.syntax_summary(counts)
    assert summary.splitlines()[-1].split() == ["total", "checked", "5", "passed", "3", "dropped", "2", "unchecked", "1"]
