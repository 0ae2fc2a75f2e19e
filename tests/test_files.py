"""utils/files.py's one record reader and one atomic writer."""

import json

import pytest

from utils.errors import CodeUpError
from utils.files import NOT_JSON, read_records, replacing, write_atomically, write_json


def test_records_of_a_list_and_of_json_lines_say_where_each_is(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([{"a": 1}, {"b": 2}]))
    (tmp_path / "lines.jsonl").write_text('{"a": 1}\n\n{"b": 2}\n')
    assert read_records(tmp_path / "list.json") == [("record 1", {"a": 1}), ("record 2", {"b": 2})]
    assert read_records(tmp_path / "lines.jsonl") == [("line 1", {"a": 1}), ("line 3", {"b": 2})]


def test_a_bad_json_line_is_an_error_or_kept_for_the_caller_to_count(tmp_path):
    path = tmp_path / "lines.jsonl"
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(CodeUpError, match="lines.jsonl line 2: not valid JSON"):
        read_records(path, what="--data_path")
    assert read_records(path, bad_lines="keep") == [("line 1", {"a": 1}), ("line 2", NOT_JSON)]


def test_an_atomic_write_leaves_the_old_file_when_the_block_fails(tmp_path):
    path = tmp_path / "out.json"
    write_json(path, {"kept": True})
    with pytest.raises(RuntimeError):
        with replacing(path) as temp:
            temp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"kept": True} and [p.name for p in tmp_path.iterdir()] == ["out.json"]
    write_atomically(path, "new\n")
    assert path.read_text() == "new\n" and path.stat().st_mode & 0o777 == 0o644


def test_a_folder_is_replaced_whole(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    (target / "old").write_text("1")
    with replacing(target, folder=True) as temp:
        (temp / "new").write_text("2")
        assert (target / "old").exists()  # the old export stays until the new one is whole
    assert [p.name for p in target.iterdir()] == ["new"] and [p.name for p in tmp_path.iterdir()] == ["export"]
