import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT
from utils.cli import one_line_arg_descriptions, parse_list, renamed_flags, run_cli


@pytest.mark.parametrize("value, expected", [
    (None, []),
    ("q_proj,v_proj", ["q_proj", "v_proj"]),
    ("[q_proj,v_proj]", ["q_proj", "v_proj"]),
    ("['q_proj', \"v_proj\"]", ["q_proj", "v_proj"]),
    (["q_proj", "v_proj"], ["q_proj", "v_proj"]),
    (("a.json",), ["a.json"]),
    ("data/a.json, data/b.json,", ["data/a.json", "data/b.json"]),
    ("", []),
])
def test_parse_list_accepts_every_spelling(value, expected):
    assert parse_list(value) == expected


def test_a_stage_piped_to_a_log_writes_each_line_as_it_comes():
    stage = ("import sys\nfrom utils.cli import run_cli\n"
             "def main():\n    print('step 1')\n    print('a notice', file=sys.stderr)\n    print('step 2')\n"
             "run_cli(main)\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", stage], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)
    assert result.stdout == "step 1\na notice\nstep 2\n"  # not held back until exit


STAGES = ["data/preprocess.py", "data/download.py", "finetune.py", "generate.py", "evaluate.py", "export_checkpoint.py"]


def documented_args(docstring: str) -> dict[str, str]:
    """Each `Args:` entry's whole text, read by indentation alone."""
    section = docstring.split("Args:", 1)[1]
    entries, name = {}, None
    for line in section.splitlines():
        if match := re.fullmatch(r" {8}(\w+): (.*)", line):
            name, entries[name] = match.group(1), match.group(2)
        elif name and line.startswith(" " * 12):
            entries[name] += " " + line.strip()
        elif line.strip():
            break
    return entries


@pytest.mark.parametrize("script", STAGES)
def test_help_shows_every_flags_whole_description(script):
    from fire import docstrings

    tree = ast.parse((ROOT / script).read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in ("main", "train")]
    docstring = next(node.body[0].value.value for node in functions if ast.get_docstring(node, clean=False))
    expected = documented_args(docstring)
    assert len(expected) >= 4
    parsed = {arg.name: " ".join(arg.description.split()) for arg in docstrings.parse(one_line_arg_descriptions(docstring)).args}
    assert parsed == {name: " ".join(text.split()) for name, text in expected.items()}


@pytest.mark.parametrize("argv, expected", [
    (["--load_8bit", "--base_model", "x"], ["--load_in_8bit", "--base_model", "x"]),
    (["--load-8bit=False"], ["--load_in_8bit=False"]),
    (["--only_benchmarks"], ["--benchmarks=only"]),
    (["--only_benchmarks", "True", "--timeout", "5"], ["--benchmarks=only", "--timeout", "5"]),
    (["--only_benchmarks=False"], []),
    (["--output_dir", "--load_8bit"], ["--output_dir", "--load_in_8bit"]),
])
def test_old_flag_names_become_todays(argv, expected):
    assert renamed_flags(argv, {"load_8bit": "load_in_8bit", "only_benchmarks": "benchmarks=only"}) == expected


# Each stage's old spelling (the 2023 scripts', or another stage's before one name per concept).
OLD_NAMES = [("finetune.py", "--prompt_template_name", "--prompt_template"),
             ("generate.py", "--load_8bit", "--load_in_8bit"),
             ("evaluate.py", "--load_8bit", "--load_in_8bit"),
             ("export_checkpoint.py", "--export_dir", "--output_dir"),
             ("export_checkpoint.py", "--dtype", "--precision"),
             ("data/download.py", "--only_benchmarks", "--benchmarks only")]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Each script's --help, all started at once (each imports torch: seconds apiece)."""
    running = {script: subprocess.Popen([sys.executable, str(ROOT / script), "--help"], text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PAGER": "cat"})
               for script in dict.fromkeys(script for script, _, _ in OLD_NAMES)}
    return {script: process.communicate(timeout=300)[0] for script, process in running.items()}


@pytest.mark.parametrize("script, old, new", OLD_NAMES)
def test_help_names_each_old_flag_once_beside_todays(helps, script, old, new):
    text = helps[script]
    assert text.count(old + " ") + text.count(old + ")") == 1 and f"{old} (now {new})" in text
    assert f"--{new.split()[0].removeprefix('--')}" in text.replace(f"(now {new})", "")


def test_an_old_flag_name_still_works(tmp_path):
    """download.py --only_benchmarks reaches main as --benchmarks only: benchmarks, no training data."""
    import download

    calls = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(download, "download_benchmarks", lambda *args, **kwargs: calls.setdefault("benchmarks", args))
        patch.setattr(download, "fetch", lambda *args, **kwargs: calls.setdefault("fetch", args))
        run_cli(download.main, argv=["--output_dir", str(tmp_path), "--only_benchmarks"],
                aliases={"only_benchmarks": "benchmarks=only"})
    assert "benchmarks" in calls and "fetch" not in calls
