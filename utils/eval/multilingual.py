"""HumanEval-X and MultiPL-E: the problems, the programs they run, and each language's toolchain.

Tasks: `humanevalx-{python,cpp,java,js,go,rust}` (CodeGeeX's HumanEval-X, 164 problems each) and
`multiple-{js,java,cpp,rs,sh,pl,go,php}` (MultiPL-E's HumanEval translations, "reworded").

How a program is assembled follows each benchmark's own harness:
- MultiPL-E: prompt + completion + "\\n" + tests (its `tests` close the function where the
  prompt left it open, then run the asserts).
- HumanEval-X (CodeGeeX's harness): prompt + completion + "\\n" + test; C++ first gets the
  standard headers CodeGeeX adds; Go is test_setup + prompt + completion + test, compiled by
  `go test` with goimports fixing the imports (CodeGeeX adds the ones the code uses; unused
  ones would not compile); Rust is `fn main(){}` + declaration + prompt + completion + test,
  compiled with `rustc --test` against the rand, regex and md5 crates CodeGeeX's Cargo.toml lists.

A completion is either the rest of the prompt (a base model's continuation: a function body) or,
from an instruction-tuned model, the whole function (maybe with imports/includes and even a main
of its own). The rule for the second kind, per language, lives in `whole_function_program`:
the prompt's header (imports, includes, `package`, `use` lines) + the answer (its own `main`
removed, Java methods taken out of any class they were wrapped in) + the tests (less the
closing brace that MultiPL-E's tests start with).

Each program then ends with a line that writes a random token to a file, so a program that
exits 0 before its tests ran fails (see utils/eval/sandbox.py).
"""

import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from utils.errors import CodeUpError
from utils.files import read_jsonl
from utils.logs import logger
from utils.eval.sandbox import RESULT_FILE, Job, Limits, Step, python_job

JAVATUPLES = "/usr/share/java/javatuples.jar"
DEBIAN_CARGO_REGISTRY = "/usr/share/cargo/registry"
GOPATH = "/usr/share/gocode"
# Where node finds npm's global packages (HumanEval-X's JavaScript/162 requires js-md5) and Debian's.
NODE_PATH = "/usr/local/lib/node_modules:/usr/lib/node_modules:/usr/share/nodejs"  # Debian's golang-*-dev packages (testify) live here


@dataclass(frozen=True)
class Language:
    key: str  # our name for it
    name: str  # for people
    fence: str  # the tag of a fenced code block
    packages: str  # the Debian packages that provide its toolchain and what the tests use


LANGUAGES = {
    "python": Language("python", "Python", "python", "python3"),
    "cpp": Language("cpp", "C++", "cpp", "g++ libboost-dev libssl-dev"),
    "java": Language("java", "Java", "java", "default-jdk-headless libjavatuples-java"),
    "js": Language("js", "JavaScript", "javascript", "nodejs"),
    "go": Language("go", "Go", "go", "golang-go golang-golang-x-tools golang-github-stretchr-testify-dev"),
    "rust": Language("rust", "Rust", "rust", "rustc cargo librust-rand-dev librust-regex-dev librust-regex+default-dev librust-md5-dev"),
    "sh": Language("sh", "Bash", "bash", "bash"),
    "perl": Language("perl", "Perl", "perl", "perl libtest-deep-perl"),
    "php": Language("php", "PHP", "php", "php-cli"),
}
HUMANEVALX_LANGUAGES = ["python", "cpp", "java", "js", "go", "rust"]
MULTIPLE_LANGUAGES = {"js": "js", "java": "java", "cpp": "cpp", "rs": "rust", "sh": "sh", "pl": "perl",
                      "go": "go", "php": "php"}  # MultiPL-E's suffix -> our language
TASKS = {f"humanevalx-{key}": ("humanevalx", key, f"humaneval-x/humaneval_{key}.jsonl") for key in HUMANEVALX_LANGUAGES}
TASKS.update({f"multiple-{suffix}": ("multiple", key, f"multipl-e/humaneval-{suffix}-reworded.jsonl")
              for suffix, key in MULTIPLE_LANGUAGES.items()})

# The headers CodeGeeX's harness puts before every C++ program (IMPORT_HELPER["cpp"]).
CPP_HEADERS = ["#include<stdlib.h>", "#include<algorithm>", "#include<math.h>", "#include<stdio.h>",
               "#include<vector>", "#include<string>", "#include<climits>", "#include<cstring>",
               "#include<iostream>", "#include<cassert>"]
# console.assert only prints; HumanEval-X's JavaScript tests use it, so make a failure throw.
JS_STRICT_ASSERT = ("console.assert = (condition, ...message) => { if (!condition) "
                    "throw new Error('Assertion failed' + (message.length ? ': ' + message.join(' ') : '')); };\n")


def is_multilingual(task: str) -> bool:
    return task in TASKS


def language_of(task: str) -> Language:
    return LANGUAGES[TASKS[task][1]]


# ---- problems -----------------------------------------------------------------------------------

def default_problems_file(task: str, benchmarks_dir: str) -> Path:
    return Path(benchmarks_dir).expanduser() / TASKS[task][2]


def load_problems(task: str, problems_file: str) -> list[dict]:
    """The task's problems as {task_id, prompt, tests, entry_point, language, benchmark, instruction,
    input, ...}: task_id is HumanEval-X's task_id or MultiPL-E's name."""
    benchmark, key, _ = TASKS[task]
    path = Path(problems_file).expanduser()
    if not path.exists():
        raise CodeUpError(f"{task}: problems file not found: {path} (get it with: python data/download.py --benchmarks only)")
    rows = [row for _, row in read_jsonl(path, what=f"{task} problems file")]
    problems = []
    for row in rows:
        try:
            problems.append(humanevalx_problem(row, key) if benchmark == "humanevalx" else multiple_problem(row, key))
        except KeyError as error:
            raise CodeUpError(f"{path}: not a {benchmark} file (a row has no {error})") from error
    if not problems:
        raise CodeUpError(f"{path}: no problems")
    return problems


def humanevalx_problem(row: dict, key: str) -> dict:
    language = LANGUAGES[key]
    shown = row["prompt"]
    if key == "rust":  # HumanEval-X's Rust prompt is only the comment: show the signature too
        shown = row["prompt"] + row["declaration"].strip() + "\n"
    problem = {"task_id": row["task_id"], "benchmark": "humanevalx", "language": key, "prompt": row["prompt"],
               "tests": row["test"], "declaration": row.get("declaration", ""),
               "test_setup": row.get("test_setup", ""), "canonical_solution": row.get("canonical_solution", ""),
               "signature": last_nonblank_line(row["declaration"] if key == "rust" else row["prompt"]), "input": shown}
    problem["entry_point"] = function_name(key, problem["signature"])
    problem["instruction"] = instruction_for(language)
    return problem


def multiple_problem(row: dict, key: str) -> dict:
    problem = {"task_id": row["name"], "benchmark": "multiple", "language": key, "prompt": row["prompt"],
               "tests": row["tests"], "stop_tokens": row.get("stop_tokens", []),
               "signature": signature_line(row["prompt"], key=key), "input": row["prompt"]}
    problem["entry_point"] = function_name(key, problem["signature"])
    problem["instruction"] = instruction_for(LANGUAGES[key])
    return problem


def instruction_for(language: Language) -> str:
    return (f"Complete the following {language.name} function. Answer with the whole function in a "
            f"```{language.fence} code block.")


def signature_line(prompt: str, key: str) -> str:
    """The line of a prompt that declares the function: its last line (Perl's prompts go on with
    the `my (...) = @_;` line after `sub name {`)."""
    if key == "perl":
        subs = [line for line in prompt.splitlines() if line.strip().startswith("sub ")]
        return subs[-1] if subs else last_nonblank_line(prompt)
    return last_nonblank_line(prompt)


def last_nonblank_line(text: str) -> str:
    """The text's last line that is not blank ("" when there is none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def function_name(key: str, signature: str) -> str:
    """The name of the function a signature line declares (`entry_point`)."""
    patterns = {"js": r"(?:function\s+(\w+)|(\w+)\s*=)", "go": r"func\s+(\w+)", "rust": r"fn\s+(\w+)",
                "perl": r"sub\s+(\w+)", "php": r"function\s+(\w+)", "sh": r"(?:function\s+)?([\w-]+)\s*\(\s*\)",
                "python": r"def\s+(\w+)"}
    match = re.search(patterns.get(key, r"(\w+)\s*\("), signature)
    if not match:
        return ""
    return next(group for group in match.groups() if group)


def defines_function(key: str, code: str, name: str) -> bool:
    """Whether `code` holds a definition of `name` (a whole function), not only its body."""
    if not name:
        return False
    n = re.escape(name)
    patterns = {
        "python": rf"^\s*def\s+{n}\s*\(",
        "js": rf"(?:function\s*\*?\s*{n}\s*\(|\b(?:const|let|var)\s+{n}\s*=\s*(?:async\s*)?(?:function\b|\([^)]*\)\s*=>|\w+\s*=>))",
        "go": rf"\bfunc\s+{n}\s*[\[(]",
        "rust": rf"\bfn\s+{n}\s*[<(]",
        "perl": rf"\bsub\s+{n}\b",
        "php": rf"\bfunction\s+{n}\s*\(",
        "sh": rf"(?:^|\n)\s*(?:function\s+)?{n}\s*(?:\(\s*\))?\s*\{{",
    }
    # C++ and Java: the name, a parameter list, then a body (a call ends with ; instead).
    pattern = patterns.get(key, rf"\b{n}\s*\([^;{{}}]*\)\s*(?:const\s*)?(?:throws[^;{{]*)?\{{")
    return re.search(pattern, code, re.MULTILINE) is not None


# ---- whole functions: the answer of an instruction-tuned model ----------------------------------

def block_end(text: str, open_brace: int) -> int:
    """The index just past the brace that closes the one at `open_brace` (strings, character
    literals and comments skipped); len(text) when it is never closed."""
    depth, i = 0, open_brace
    while i < len(text):
        char = text[i]
        if text.startswith("//", i):
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            continue
        if text.startswith("/*", i):
            i = text.find("*/", i + 2)
            i = len(text) if i < 0 else i + 2
            continue
        if char in "\"`" or (char == "'" and re.match(r"'(?:\\.[^']*|[^\\'])'", text[i:i + 12])):
            j = i + 1
            while j < len(text) and text[j] != char:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return len(text)


def remove_function(code: str, pattern: str) -> str:
    """`code` without the function whose header matches `pattern` (e.g. the answer's own main)."""
    match = re.search(pattern, code)
    if not match:
        return code
    brace = code.find("{", match.end())
    if brace < 0:
        return code
    return code[:match.start()] + code[block_end(code, open_brace=brace):]


MAIN_FUNCTIONS = {"cpp": r"\bint\s+main\s*\(", "rust": r"\bfn\s+main\s*\(\s*\)", "go": r"\bfunc\s+main\s*\(\s*\)",
                  "java": r"(?:public\s+)?static\s+void\s+main\s*\("}


def header_lines(text: str, key: str) -> list[str]:
    """The lines of a prompt or answer that set the stage: includes, imports, package, use."""
    starts = {"cpp": ("#include", "using namespace"), "java": ("import ",), "rust": ("use ", "extern crate"),
              "go": ("import ", "package "), "js": ("const ", "import ", "require("), "php": ("<?php",),
              "perl": ("use ",), "sh": ("#!",), "python": ("import ", "from ")}[key]
    return [line for line in text.splitlines() if line.strip().startswith(starts)]


def unwrap_java_class(code: str) -> tuple[list[str], str]:
    """(the imports, the members): Java methods taken out of the class an answer wrapped them in."""
    imports = [line for line in code.splitlines() if line.strip().startswith("import ")]
    body = "\n".join(line for line in code.splitlines() if not line.strip().startswith(("import ", "package ")))
    body = remove_function(body, pattern=r"(?:public\s+)?class\s+Main\b[^{]*")  # a demo Main class of its own
    match = re.search(r"\bclass\s+\w+[^{]*\{", body)
    if match:
        end = block_end(body, open_brace=match.end() - 1)
        body = body[match.end():end - 1]
    return imports, remove_function(body, pattern=MAIN_FUNCTIONS["java"])


def rust_use_lines_to_keep(code: str, declaration: str) -> str:
    """An answer's `use` lines, less those that would import a name the declaration already
    imports (Rust rejects a name imported twice)."""
    declared = set(re.findall(r"\w+", " ".join(header_lines(declaration, key="rust"))))
    kept = []
    for line in code.splitlines():
        if line.strip().startswith("use "):
            names = set(re.findall(r"(\w+)\s*[,};]", line))
            if names and names <= declared:
                continue
        kept.append(line)
    return "\n".join(kept)


def whole_function_program(problem: dict, code: str) -> str:
    """The program for an answer that holds the whole function (see the module docstring)."""
    key, prompt, tests = problem["language"], problem["prompt"], problem["tests"]
    if key == "python":
        return prompt + "    pass\n\n" + code + "\n" + tests + "\n"
    if key in MAIN_FUNCTIONS and key != "java":
        code = remove_function(code, pattern=MAIN_FUNCTIONS[key])
    if problem["benchmark"] == "multiple":
        # The tests start by closing the function the prompt opened: the answer closed it itself.
        tests = re.sub(r"^\s*\}[ \t]*\n", "\n", tests, count=1)
        before_signature = prompt[:prompt.rfind(problem["signature"])]
        if key == "java":
            imports, members = unwrap_java_class(code)
            return "\n".join(imports) + "\n" + before_signature + members + "\n" + tests
        if key == "php":  # the prompt opened PHP already
            code = re.sub(r"^\s*<\?php\s*|\s*\?>\s*$", "", code)
        if key == "go":  # package and imports come first; goimports drops the duplicates
            body = "\n".join(line for line in code.splitlines() if not line.strip().startswith("package "))
            head, imports = split_go_imports(before_signature)
            return head + imports + "\n" + body + "\n" + tests
        return before_signature + code + "\n" + tests
    if key == "cpp":
        headers = [h for h in CPP_HEADERS if h not in prompt] + header_lines(prompt, key="cpp")
        return "\n".join(headers) + "\n" + code + "\n" + tests
    if key == "java":
        imports, members = unwrap_java_class(code)
        class_line = re.search(r"^.*\bclass\s+Solution\b.*\{.*$", prompt, re.MULTILINE)
        head = prompt[:class_line.end()] if class_line else "\n".join(header_lines(prompt, key="java")) + "\nclass Solution {"
        return "\n".join(imports) + "\n" + head + "\n" + members + "\n}\n" + tests
    if key == "js":
        return JS_STRICT_ASSERT + code + "\n" + tests
    if key == "go":
        body = "\n".join(line for line in code.splitlines() if not line.strip().startswith("package "))
        return problem["test_setup"] + "\n" + body + "\n" + tests
    if key == "rust":
        uses = "\n".join(header_lines(problem["declaration"], key="rust"))
        return "\nfn main(){ \n } \n" + uses + "\n" + rust_use_lines_to_keep(code, declaration=problem["declaration"]) + "\n" + tests
    raise ValueError(f"no whole-function rule for {key}")


def split_go_imports(text: str) -> tuple[str, str]:
    """(package line, the rest) of a Go file head, so that an answer's own imports can follow."""
    match = re.search(r"^package\s+\w+\s*$", text, re.MULTILINE)
    if not match:
        return "", text
    return text[:match.end()] + "\n", text[match.end():]


def completion_program(problem: dict, completion: str) -> str:
    """The benchmark's own convention for a completion that continues the prompt."""
    key, prompt, tests = problem["language"], problem["prompt"], problem["tests"]
    if problem["benchmark"] == "multiple":
        return prompt + completion + "\n" + tests
    if key == "cpp":
        headers = "".join(h + "\n" for h in CPP_HEADERS if h not in prompt)
        return headers + "\n" + prompt + completion + "\n" + tests
    if key == "js":
        return JS_STRICT_ASSERT + prompt + completion + "\n" + tests
    if key == "go":
        return problem["test_setup"] + "\n" + prompt + completion + "\n" + tests
    if key == "rust":
        return "\nfn main(){ \n } \n" + problem["declaration"] + prompt + completion + tests
    return prompt + completion + "\n" + tests  # python, java


def build_program(problem: dict, code: str) -> str:
    """The source a sample runs as: the whole-function rule when the answer defines the function,
    else the benchmark's completion convention."""
    if defines_function(problem["language"], code, name=problem["entry_point"]):
        return whole_function_program(problem, code)
    return completion_program(problem, code)


# ---- jobs: files, compile and run steps, per language ------------------------------------------

def compile_limits() -> Limits:
    # Compilers need more memory, processes and time than the programs they build.
    return Limits(timeout=60.0, memory_mb=4096, file_size_mb=256, processes=256)


def build_job(problem: dict, code: str, timeout: float) -> Job:
    return job_for_source(problem["language"], build_program(problem, code), benchmark=problem["benchmark"], timeout=timeout)


def job_for_source(key: str, source: str, benchmark: str, timeout: float) -> Job:
    token = secrets.token_hex(16)
    run_limits = Limits(timeout=timeout)
    compiling = compile_limits()
    if key == "python":
        return python_job(source, limits=run_limits)
    if key == "js":
        source += f"\n;require('fs').writeFileSync({RESULT_FILE!r}, {token!r});\n"
        run = Step(["node", "--max-old-space-size=512", "program.js"], Limits(timeout=timeout, memory_mb=2048),
                   {"NODE_PATH": NODE_PATH})
        return Job({"program.js": source}, run, token)
    if key == "sh":
        source += f"\nprintf '%s' '{token}' > {RESULT_FILE}\n"
        return Job({"program.sh": source}, Step(["bash", "program.sh"], run_limits), token)
    if key == "perl":
        source += (f"\n;open(my $codeup_result, '>', '{RESULT_FILE}') or die; print $codeup_result '{token}';"
                   " close($codeup_result);\n")
        return Job({"program.pl": source}, Step(["perl", "program.pl"], run_limits), token)
    if key == "php":
        write = f"file_put_contents('{RESULT_FILE}', '{token}');"
        source += f"\n<?php {write} ?>\n" if source.rstrip().endswith("?>") else f"\n{write}\n"
        return Job({"program.php": source}, Step(["php", "program.php"], Limits(timeout=timeout, memory_mb=2048)), token)
    if key == "cpp":
        source = re.sub(r"\bint\s+main\s*\(", "int codeup_tested_main(", source)
        source += ("\n#include <cstdio>\nint main() {\n    codeup_tested_main();\n"
                   f"    std::FILE* result = std::fopen({json.dumps(RESULT_FILE)}, \"w\");\n"
                   f"    std::fputs({json.dumps(token)}, result);\n    std::fclose(result);\n    return 0;\n}}\n")
        standard = "-std=c++11" if benchmark == "humanevalx" else "-std=c++17"
        compile_step = Step(["g++", standard, "-w", "program.cpp", "-o", "program", "-lcrypto", "-lssl"], compiling)
        return Job({"program.cpp": source}, Step(["./program"], run_limits), token, compile_step)
    if key == "java":
        main_class = "Main" if benchmark == "humanevalx" else "Problem"
        runner = (f"public class CodeupRunner {{\n    public static void main(String[] args) throws Throwable {{\n"
                  f"        {main_class}.main(args);\n        java.nio.file.Files.writeString("
                  f"java.nio.file.Path.of({json.dumps(RESULT_FILE)}), {json.dumps(token)});\n    }}\n}}\n")
        jvm = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xshare:auto"]
        compile_step = Step(["javac", *[f"-J{flag}" for flag in jvm], "-J-Xmx512m", "-nowarn", "-encoding", "UTF-8",
                             "-cp", JAVATUPLES, "-d", ".", f"{main_class}.java", "CodeupRunner.java"], compiling)
        run = Step(["java", *jvm, "-Xmx512m", "-Xss8m", "-Djava.io.tmpdir=.", "-ea", "-cp", f".:{JAVATUPLES}", "CodeupRunner"],
                   Limits(timeout=timeout + 2.0, memory_mb=4096, processes=256))
        return Job({f"{main_class}.java": source, "CodeupRunner.java": runner}, run, token, compile_step)
    if key == "go":
        package = re.search(r"^package\s+(\w+)", source, re.MULTILINE)
        test_main = (f"package {package.group(1) if package else 'main'}\n\nimport (\n    \"os\"\n    \"testing\"\n)\n\n"
                     "func TestMain(m *testing.M) {\n    code := m.Run()\n    if code == 0 {\n"
                     f"        os.WriteFile({json.dumps(RESULT_FILE)}, []byte({json.dumps(token)}), 0o644)\n"
                     "    }\n    os.Exit(code)\n}\n")
        compile_step = Step(["/bin/sh", "-c", "goimports -w program_test.go && exec go test -c -o program.test"],
                            compiling, {"GO111MODULE": "off", "GOPATH": GOPATH, "CGO_ENABLED": "0",
                                        "GOCACHE": "{slot_cache}/go", "GOFLAGS": "-buildvcs=false"})
        run = Step(["./program.test", "-test.count=1"], run_limits)
        return Job({"program_test.go": source, "codeup_main_test.go": test_main}, run, token, compile_step)
    if key == "rust":
        if benchmark == "humanevalx":
            source += ("\n#[cfg(test)]\nmod zzzz_codeup_end {\n    #[test]\n    fn zzzz_codeup_end() {\n"
                       f"        std::fs::write({json.dumps(RESULT_FILE)}, {json.dumps(token)}).unwrap();\n    }}\n}}\n")
            crates = rust_crates()
            command = ["rustc", "--edition", "2021", "--test", "-C", "debuginfo=0", "-A", "warnings", "program.rs",
                       "-o", "program", "-L", f"dependency={crates['dir']}",
                       *[arg for name in ("rand", "regex", "md5") for arg in ("--extern", f"{name}={crates[name]}")]]
            run = Step(["./program", "--test-threads=1", "-q"], run_limits)
        else:
            source = re.sub(r"\bfn\s+main\s*\(\s*\)", "fn codeup_tested_main()", source)
            source += (f"\nfn main() {{\n    codeup_tested_main();\n    std::fs::write({json.dumps(RESULT_FILE)}, "
                       f"{json.dumps(token)}).unwrap();\n}}\n")
            command = ["rustc", "--edition", "2021", "-C", "debuginfo=0", "-A", "warnings", "program.rs", "-o", "program"]
            run = Step(["./program"], run_limits)
        return Job({"program.rs": source}, run, token, Step(command, compiling))
    raise ValueError(f"unknown language {key}")


# ---- toolchains ----------------------------------------------------------------------------------

def check_toolchain(key: str, benchmark: str) -> None:
    """Raise one clear error naming the Debian packages when a language's tools are missing."""
    language = LANGUAGES[key]
    sandbox_path = "/usr/local/bin:/usr/bin:/bin"
    tools = {"python": ["python3"], "cpp": ["g++"], "java": ["javac", "java"], "js": ["node"],
             "go": ["go", "goimports"], "rust": ["rustc"], "sh": ["bash"], "perl": ["perl"], "php": ["php"]}[key]
    missing = [tool for tool in tools if not shutil.which(tool, path=sandbox_path)]
    if key == "cpp" and benchmark == "humanevalx":
        missing += [h for h in ("/usr/include/boost/any.hpp", "/usr/include/openssl/md5.h") if not Path(h).exists()]
    if key == "java" and not Path(JAVATUPLES).exists():
        missing.append(JAVATUPLES)
    if key == "go" and benchmark == "humanevalx" and not Path(GOPATH, "src/github.com/stretchr/testify").is_dir():
        missing.append("testify")
    if key == "js" and benchmark == "humanevalx" and not missing and subprocess.run(
            ["node", "-e", "require('js-md5')"], capture_output=True, env={"PATH": sandbox_path, "NODE_PATH": NODE_PATH}).returncode:
        raise CodeUpError("HumanEval-X's JavaScript tests need the js-md5 package: npm install -g js-md5 "
                          "(or: bash setup.sh --toolchains)")
    if key == "perl" and not missing and subprocess.run(["perl", "-MTest::Deep", "-e", "1"], capture_output=True).returncode:
        missing.append("Test::Deep")
    if key == "rust" and benchmark == "humanevalx":
        # aho-corasick: one of regex's default features (Debian's librust-regex+default-dev)
        for crate in ("rand-0.8", "regex-1", "aho-corasick-", "md5-0"):
            if not list(Path(DEBIAN_CARGO_REGISTRY).glob(f"{crate}*")):
                missing.append(f"the {crate.rstrip('-0123456789.')} crate")
    if missing:
        raise CodeUpError(f"{language.name} needs {', '.join(missing)}: "
                          f"apt-get install {language.packages} (or: bash setup.sh --toolchains)")


@functools.cache
def rust_crates() -> dict:
    """rand, regex and md5 built once from Debian's crate sources (offline), for `rustc --extern`:
    {"dir": the deps folder, "rand": its .rlib, ...}. Kept in a folder every sandbox uid can read."""
    version = subprocess.run(["rustc", "--version"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin"}).stdout.strip()
    folder = Path(tempfile.gettempdir()) / f"codeup-rust-crates-{os.geteuid()}-{hashlib.sha256(version.encode()).hexdigest()[:12]}"
    deps = folder / "target" / "release" / "deps"
    found = {name: sorted(deps.glob(f"lib{name}-*.rlib")) for name in ("rand", "regex", "md5")}
    if not all(found.values()) or not folder.is_dir() or folder.stat().st_uid != os.geteuid():
        logger.info(f"Building the rand, regex and md5 crates for HumanEval-X's Rust tests into {folder} "
                    "(once, offline, about 30 s)")
        shutil.rmtree(folder, ignore_errors=True)
        (folder / "src").mkdir(parents=True)
        (folder / ".cargo").mkdir()
        (folder / "Cargo.toml").write_text('[package]\nname = "codeup-crates"\nversion = "0.1.0"\nedition = "2021"\n\n'
                                           '[dependencies]\nrand = "0.8"\nregex = "1"\nmd5 = "0.7"\n')
        (folder / "src" / "lib.rs").write_text("")
        (folder / ".cargo" / "config.toml").write_text(
            f'[source.crates-io]\nreplace-with = "debian"\n\n[source.debian]\ndirectory = "{DEBIAN_CARGO_REGISTRY}"\n')
        environment = {"PATH": "/usr/bin:/bin", "RUSTC": "/usr/bin/rustc", "CARGO_HOME": str(folder / ".cargo-home"),
                       "HOME": str(folder)}
        built = subprocess.run(["cargo", "build", "--offline", "--release", "-q"], cwd=folder, env=environment,
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise CodeUpError(f"cannot build the rand/regex/md5 crates HumanEval-X's Rust tests use: "
                              f"{last_nonblank_line(built.stderr)} (apt-get install {LANGUAGES['rust'].packages})")
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o755 if path.is_dir() else path.stat().st_mode | 0o644)
        found = {name: sorted(deps.glob(f"lib{name}-*.rlib")) for name in ("rand", "regex", "md5")}
    return {"dir": str(deps), **{name: str(paths[-1]) for name, paths in found.items()}}
