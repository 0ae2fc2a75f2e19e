"""Every file a stage reads goes through utils/files.py: a binary file, truncated JSON, a folder
or an unreadable file is one `error:` line naming the file, exit 2, no traceback, nothing written."""

import json
import re
from pathlib import Path

import pytest

from utils.cli import run_cli
from utils.errors import CodeUpError
from utils.files import read_json, read_jsonl, read_text


RECORDS = [{"instruction": "Write a Python function that adds two numbers.", "input": "", "output": "def add(a, b):\n    return a + b"}]


def bad_file(kind: str, folder: Path, suffix: str) -> Path:
    """A file of the given kind of badness, named like the good one would be."""
    path = folder / f"{kind}{suffix}"
    if kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)  # 0x80.. are not UTF-8
    elif kind == "latin1":
        path.write_bytes(json.dumps(RECORDS).replace("adds", "addiert für").encode("latin-1"))
    elif kind == "truncated":
        text = json.dumps(RECORDS) if suffix == ".json" else "\n".join(json.dumps(r) for r in RECORDS * 2)
        path.write_text(text[: len(text) - 7], encoding="utf-8")
    elif kind == "folder":
        path.mkdir()
    return path


def run_stage(main, argv, capsys) -> str:
    """Run a stage's CLI in this process; return its stderr after checking exit 2 and one line."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv=argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind, message", [
    ("binary", "line 2: not UTF-8 text (byte 0x80 at offset 128)"),  # byte 10 ends line 1
    ("latin1", "not UTF-8 text (byte 0xfc"),
    ("folder", "is a folder, not a file"),
])
def test_the_reader_names_the_file_and_what_is_wrong(tmp_path, kind, message):
    path = bad_file(kind, tmp_path, ".json")
    with pytest.raises(CodeUpError, match=re.escape(message)) as error:
        read_text(path, what="data file")
    assert str(path) in str(error.value)


def test_truncated_json_says_where_and_that_it_ends_early(tmp_path):
    path = bad_file("truncated", tmp_path, ".json")
    with pytest.raises(CodeUpError, match=r"line 1 column \d+: not valid JSON .*is it truncated"):
        read_json(path)
    lines = tmp_path / "rows.jsonl"
    lines.write_text('{"a": 1}\n\n{"a": 2\n', encoding="utf-8")
    with pytest.raises(CodeUpError, match=r"rows.jsonl line 3: not valid JSON"):
        read_jsonl(lines)


def test_missing_and_unreadable_files(tmp_path, monkeypatch):
    with pytest.raises(CodeUpError, match=r"^--samples_file not found: .*nope.jsonl$"):
        read_jsonl(tmp_path / "nope.jsonl", what="--samples_file")
    path = tmp_path / "secret.json"
    path.write_text("[]")

    def denied(self):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "read_bytes", denied)  # root reads every file: simulate a denial
    with pytest.raises(CodeUpError, match=r"cannot read data file .*secret.json: Permission denied"):
        read_json(path, what="data file")


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(RECORDS).encode())
    assert read_json(path) == RECORDS


KINDS = ["binary", "truncated", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_preprocess_data_paths(tmp_path, capsys, kind):
    import preprocess

    for suffix in (".json", ".jsonl"):
        folder = tmp_path / suffix.strip(".")
        folder.mkdir()
        path = bad_file(kind, folder, suffix)
        err = run_stage(preprocess.main, ["--data_paths", str(path), "--output_dir", str(folder / "out")], capsys)
        assert str(path) in err
        assert not (folder / "out").exists()  # nothing written


@pytest.mark.parametrize("kind", KINDS)
def test_evaluate_samples_file_and_mbpp_path(tmp_path, capsys, kind):
    import evaluate

    path = bad_file(kind, tmp_path, ".jsonl")
    out = tmp_path / "eval"
    err = run_stage(evaluate.main, ["--task", "humaneval", "--samples_file", str(path), "--output_dir", str(out)], capsys)
    assert str(path) in err and not out.exists()
    err = run_stage(evaluate.main, ["--task", "mbpp", "--mbpp_path", str(path), "--samples_file", str(path),
                                    "--output_dir", str(out)], capsys)
    assert str(path) in err and not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_finetune_data_path(tiny_llama_dir, tmp_path, capsys, kind):
    import finetune

    path = bad_file(kind, tmp_path, ".json")
    out = tmp_path / "lora"
    err = run_stage(finetune.main, ["--base_model", str(tiny_llama_dir), "--data_path", str(path),
                                    "--output_dir", str(out), "--report_to", "none"], capsys)
    assert str(path) in err and not out.exists()


def test_debug_prints_the_traceback_behind_the_error(tmp_path, capsys, monkeypatch):
    import evaluate

    path = bad_file("binary", tmp_path, ".jsonl")
    monkeypatch.setenv("CODEUP_DEBUG", "1")
    with pytest.raises(SystemExit):
        run_cli(evaluate.main, argv=["--samples_file", str(path), "--output_dir", str(tmp_path / "eval")])
    err = capsys.readouterr().err
    assert "Traceback" in err and "UnicodeDecodeError" in err  # the cause is kept
    assert err.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.parametrize("kind", KINDS)
def test_generate_prompts_file_before_the_model_loads(tmp_path, capsys, kind, monkeypatch):
    import generate

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the prompts file was read")

    monkeypatch.setattr(generate, "Generator", no_model)
    path = bad_file(kind, tmp_path, ".jsonl")
    out = tmp_path / "answers.jsonl"
    err = run_stage(generate.main, ["--prompts_file", str(path), "--output_file", str(out)], capsys)
    assert str(path) in err and not out.exists()


@pytest.mark.parametrize("kind", KINDS)
def test_export_adapter_config(tiny_llama_dir, tmp_path, capsys, kind):
    import export_checkpoint

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    bad = bad_file(kind, tmp_path, ".json")
    bad.rename(adapter / "adapter_config.json")
    out = tmp_path / "export"
    err = run_stage(export_checkpoint.main, ["--base_model", str(tiny_llama_dir), "--lora_weights", str(adapter),
                                             "--output_dir", str(out)], capsys)
    assert "adapter_config.json" in err and not out.exists()
