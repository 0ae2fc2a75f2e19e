"""The evaluation stage: correct scores on known answers, and a sandbox that survives hostile code."""

import json
import os
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, SHARED_DATA

import evaluate  # noqa: E402
from utils.eval.benchmarks import load_humaneval
from utils.eval import scoring
from utils.eval.programs import humaneval_program
from utils.eval.sandbox import isolation, run_programs
from test_sandbox_isolation import harness_uids  # the uid registry's tests say how to read it

MBPP = SHARED_DATA / "mbpp.jsonl"


def write_samples(path, samples):
    path.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c in samples))
    return path


def run_evaluate(*args):
    return subprocess.run([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)


def run_evaluate_with_pid(*args):
    """Like run_evaluate, but also says the harness's pid (whose sandbox uids to watch)."""
    process = subprocess.Popen([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = process.communicate(timeout=900)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid


def results(output_dir, task="humaneval"):
    samples = [json.loads(line) for line in (output_dir / f"{task}_samples.jsonl").read_text().splitlines()]
    return json.loads((output_dir / f"{task}_results.json").read_text()), samples


@pytest.mark.slow
def test_canonical_humaneval_solutions_all_pass(tmp_path):
    problems = load_humaneval()
    samples = write_samples(tmp_path / "canonical.jsonl", [(p["task_id"], p["canonical_solution"]) for p in problems])
    # A generous timeout: this checks answers, not speed (a loaded machine must not fail it).
    result = run_evaluate("--samples_file", samples, "--output_dir", tmp_path / "out", "--timeout", 30)
    assert result.returncode == 0, result.stderr[-3000:]
    scores, rows = results(tmp_path / "out")
    assert scores["pass@1"] == 1.0 and scores["problems"] == 164 and scores["passed"] == 164
    assert "pass@10" not in scores  # one sample per problem cannot estimate pass@10
    assert all(row["passed"] and row["result"] == "passed" for row in rows)


@pytest.mark.slow
def test_empty_completions_score_zero(tmp_path):
    samples = write_samples(tmp_path / "empty.jsonl", [(p["task_id"], "") for p in load_humaneval()])
    result = run_evaluate("--samples_file", samples, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    scores, _ = results(tmp_path / "out")
    assert scores["pass@1"] == 0.0 and scores["passed"] == 0
    # stderr is a pipe here, as a log file would be: no progress bar redrawn into it
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr and "Executing" not in result.stderr


@pytest.mark.parametrize("n, c, k, expected", [
    (5, 2, 1, 0.4),           # c / n
    (5, 2, 2, 0.7),           # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
    (5, 0, 3, 0.0),
    (5, 4, 2, 1.0),           # n - c < k
    (1, 1, 1, 1.0),
])
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert scoring.pass_at_k(n, c, k) == pytest.approx(expected)


def test_mean_pass_at_k_skips_k_above_n():
    scores = scoring.mean_pass_at_k({"a": [True, False], "b": [False, False]}, [1, 2, 10])
    assert scores == {"pass@1": pytest.approx(0.25), "pass@2": pytest.approx(0.5)}


def test_code_extraction():
    response = "Here it is:\n```python\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n```\nDone."
    assert evaluate.extract_code(response) == "import math\n\ndef f(x):\n    return math.sqrt(x)\n"
    assert evaluate.extract_code("```\nprint(1)\n```\n```py\ndef g(): pass\n```") == "def g(): pass\n"
    assert evaluate.extract_code("    return x + 1\n") == "    return x + 1\n"  # a body, no fence
    assert evaluate.extract_code("```python\ndef h():\n    return 1") == "def h():\n    return 1"  # unclosed


def test_a_whole_function_or_a_body_both_complete_the_prompt():
    problem = load_humaneval()[2]  # truncate_number
    body = problem["canonical_solution"]
    whole = "def truncate_number(number: float) -> float:\n" + body
    for code in (body, whole):
        assert run_programs([humaneval_program(problem, code)], progress=False)[0].passed


@pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data is not here")
@pytest.mark.slow
def test_mbpp_reference_code_passes_on_the_test_split(tmp_path):
    tasks = [json.loads(line) for line in MBPP.read_text().splitlines()]
    samples = write_samples(tmp_path / "reference.jsonl", [(f"MBPP/{t['task_id']}", t["code"]) for t in tasks])
    result = run_evaluate("--task", "mbpp", "--mbpp_path", MBPP, "--samples_file", samples, "--output_dir", tmp_path / "out",
                          "--timeout", 30)
    assert result.returncode == 0, result.stderr[-3000:]
    scores, _ = results(tmp_path / "out", "mbpp")
    assert scores["problems"] == 500 and scores["pass@1"] == 1.0


@pytest.mark.skipif(not MBPP.is_file(), reason="../shared/data is not here")
def test_mbpp_prompts_state_the_function_name():
    problems = scoring.load_problems("mbpp", str(MBPP), limit=3)
    assert [p["task_id"] for p in problems] == ["MBPP/11", "MBPP/12", "MBPP/13"]
    assert "The function is called `remove_Occ`." in problems[0]["instruction"]
    assert problems[0]["tests"][0] in problems[0]["instruction"]


@pytest.mark.slow
def test_bad_arguments_fail_in_one_line(tmp_path):
    result = run_evaluate("--task", "apps")
    assert result.returncode == 2 and "--task must be humaneval, mbpp, or" in result.stderr
    result = run_evaluate("--samples_file", tmp_path / "none.jsonl")
    assert result.returncode == 2 and "--samples_file not found" in result.stderr
    assert "Traceback" not in result.stderr


# ---- the sandbox ---------------------------------------------------------------------------------

def spy_on_processes(marker: str, what: str) -> str:
    """A function body that looks through /proc/*/{what} (cmdline, environ) of every process it
    can see for `marker` (split in two, so that the source itself never holds it), and fails with
    what it found: the result field of the samples file would show it."""
    half = len(marker) // 2
    return ("    import os\n    found = []\n    for pid in os.listdir('/proc'):\n        try:\n"
            f"            with open('/proc/' + pid + '/{what}', 'rb') as f:\n"
            "                text = f.read().decode(errors='replace')\n"
            "        except OSError:\n            continue\n"
            f"        if {marker[:half]!r} + {marker[half:]!r} in text:\n"
            "            found.append(text.replace(chr(0), ' '))\n"
            "    raise AssertionError('found: ' + ' | '.join(found) if found else 'nothing found')\n")


def hostile_completions(canary, marker="codeup-marker-unused"):
    """Function bodies for HumanEval/0 that misbehave; none may pass, or harm anything. `marker`:
    the command line and environment of a process beside the harness, which none may read."""
    return {
        "read other processes' command lines": spy_on_processes(marker, "cmdline"),
        "read other processes' environments": spy_on_processes(marker, "environ"),
        "write to /dev/shm": "    with open('/dev/shm/codeup-hostile', 'w') as f:\n        f.write('x')\n    return True\n",
        "signal process 1 outside": "    import os, signal\n    os.kill(1, signal.SIGKILL)\n    return True\n",
        "ptrace another process": ("    import ctypes, os\n    libc = ctypes.CDLL(None)\n"
                                   "    assert all(libc.ptrace(16, int(p), 0, 0) != 0 for p in os.listdir('/proc') if p.isdigit())\n"),
        "infinite loop": "    while True:\n        pass\n",
        "sleep forever": "    import time\n    time.sleep(10**6)\n",
        "fork bomb": "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n",
        "allocate 10 GB": "    block = bytearray(10 * 2**30)\n    return True\n",
        "write a 1 GB file": "    with open('big.bin', 'wb') as f:\n        for _ in range(1024):\n            f.write(b'0' * 2**20)\n    return True\n",
        "delete outside its dir": f"    import os\n    os.remove({str(canary)!r})\n    return True\n",
        "read stdin": "    return input() == 'yes'\n",
        "close stdout": "    import os\n    os.close(1)\n    os.close(2)\n    return True\n",
        "unbounded output": "    while True:\n        print('x' * 10000)\n",
        "kill the parent": "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return True\n",
        "exit before the asserts": "    import sys\n    sys.exit(0)\n",
        "exit at import": "    return True\n\nimport sys\nsys.exit(0)\n",
    }


@pytest.mark.slow
def test_hostile_programs_fail_and_harm_nothing(tmp_path):
    canary_dir = tmp_path / "shared"
    canary_dir.mkdir()
    os.chmod(tmp_path, 0o755)
    os.chmod(canary_dir, 0o755)  # visible to the sandbox user, not writable
    canary = canary_dir / "canary.txt"
    canary.write_text("still here")
    # A process beside the harness with a secret on its command line and in its environment.
    marker = "codeup-marker-" + os.urandom(6).hex()
    bystander = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(600)", marker],
                                 env={"CODEUP_SECRET": marker})
    hostile = hostile_completions(canary, marker)
    samples = write_samples(tmp_path / "hostile.jsonl", [("HumanEval/0", code) for code in hostile.values()])
    try:
        result, harness_pid = run_evaluate_with_pid("--samples_file", samples, "--output_dir", tmp_path / "out",
                                                    "--timeout", 2, "--limit", 1)
    finally:
        bystander.kill()
        bystander.wait()
    assert result.returncode == 0, result.stderr[-3000:]
    scores, rows = results(tmp_path / "out")
    outcomes = {name: row for name, row in zip(hostile, rows)}
    assert not [name for name, row in outcomes.items() if row["passed"]]
    assert scores["pass@1"] == 0.0 and scores["samples"] == len(hostile)
    assert outcomes["infinite loop"]["result"].startswith("timed out")
    assert outcomes["exit before the asserts"]["result"] == "exited before the end of the tests"
    assert canary.read_text() == "still here"
    assert marker not in (tmp_path / "out" / "humaneval_samples.jsonl").read_text()  # the secret never lands in the results
    for spy in ("read other processes' command lines", "read other processes' environments"):
        assert outcomes[spy]["result"] == "AssertionError: nothing found", outcomes[spy]["result"]  # it looked, saw nothing
    assert not os.path.exists("/dev/shm/codeup-hostile")
    assert not list(tmp_path.rglob("big.bin"))  # temp dirs are gone
    if isolation() == "namespaces":  # every process of the sandbox uids is gone (the kernel reaps them)
        deadline = time.time() + 10
        while sandbox_processes(harness_pid) and time.time() < deadline:
            time.sleep(0.2)
        assert not sandbox_processes(harness_pid)


def sandbox_processes(harness_pid):
    uids = harness_uids(harness_pid)
    return [p for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] and p.info["uids"].real in uids and p.info["status"] != psutil.STATUS_ZOMBIE]


def test_programs_run_without_the_harness_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CODEUP_SECRET_TOKEN", "hunter2")
    probe = "import os\nassert 'CODEUP_SECRET_TOKEN' not in os.environ\nassert os.getcwd() != " + repr(os.getcwd())
    [outcome] = run_programs([probe], progress=False)
    assert outcome.passed, outcome.message
    if os.geteuid() == 0:
        [outcome] = run_programs(["import os\nassert os.getuid() != 0"], progress=False)
        assert outcome.passed, outcome.message


@pytest.mark.skipif(os.geteuid() != 0, reason="finds the programs by their uids, which needs root")
def test_a_killed_harness_leaves_no_program_behind():
    # The harness dies (SIGKILL: no cleanup of its own) while its programs sleep: the launchers
    # notice, kill their programs and end.
    harness = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, '.')\n"
        "from utils.eval.sandbox import Limits, run_programs\n"
        "run_programs(['import time\\ntime.sleep(120)'] * 2, Limits(timeout=120), workers=2, progress=False)\n")],
        cwd=ROOT)
    try:
        deadline = time.time() + 60
        while len([p for p in sandbox_processes(harness.pid) if "program.py" in p.cmdline()]) < 2:
            assert time.time() < deadline, "the programs never started"
            time.sleep(0.1)
        launchers = [p for p in psutil.Process(harness.pid).children() if "sandbox.py" in " ".join(p.cmdline())]
        assert len(launchers) == 2
    finally:
        harness.kill()
        harness.wait()
    deadline = time.time() + 10
    while (sandbox_processes(harness.pid) or any(p.is_running() for p in launchers)) and time.time() < deadline:
        time.sleep(0.2)
    assert not sandbox_processes(harness.pid)
    assert not [p for p in launchers if p.is_running()]


@pytest.mark.skipif(isolation() != "namespaces", reason="needs root (namespaces)")
def test_programs_see_no_network():
    [outcome] = run_programs(
        ["import socket\ns = socket.socket()\ns.settimeout(1)\ns.connect(('127.0.0.1', 9))"], progress=False)
    assert not outcome.passed and "unreachable" in outcome.message.lower()


@pytest.mark.slow
def test_smollm2_short_real_run_writes_both_files(smollm2_dir, tmp_path):
    result = run_evaluate("--limit", 5, "--max_new_tokens", 96, "--output_dir", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    scores, rows = results(tmp_path / "out")
    assert scores["problems"] == 5 and scores["samples"] == 5 and "pass@1" in scores
    assert scores["model"] == "smollm2-135m" and scores["settings"]["temperature"] == 0.0
    assert all(row["response"] and row["prompt"].startswith("Below is an instruction") for row in rows)
    assert {"task_id", "prompt", "response", "code", "passed", "result"} <= set(rows[0])
