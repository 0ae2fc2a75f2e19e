import pytest

from utils.cli import parse_list


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
