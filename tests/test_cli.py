import os
import subprocess
import sys

import pytest

from conftest import ROOT
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


def test_a_stage_piped_to_a_log_writes_each_line_as_it_comes():
    stage = ("import sys\nfrom utils.cli import run_cli\n"
             "def main():\n    print('step 1')\n    print('a notice', file=sys.stderr)\n    print('step 2')\n"
             "run_cli(main)\n")
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    result = subprocess.run([sys.executable, "-c", stage], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=120)
    assert result.stdout == "step 1\na notice\nstep 2\n"  # not held back until exit
