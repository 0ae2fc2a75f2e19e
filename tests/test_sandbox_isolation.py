"""The sandbox hides the machine: a /proc of the program's own, a remount that fails stops the
program, uids that two harnesses never share, and no model code without a sandbox unless asked."""

import fcntl
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from conftest import ROOT

import evaluate  # noqa: E402
from utils.eval import sandbox
from utils.eval.benchmarks import load_humaneval
from utils.cli import run_cli
from utils.eval.sandbox import isolation, run_programs

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and the uid registry need root")


@pytest.fixture
def bystander():
    """A process beside the harness with a marker on its command line and in its environment."""
    marker = "codeup-bystander-" + os.urandom(6).hex()
    process = subprocess.Popen(["/usr/bin/python3", "-c", "import time; time.sleep(600)", marker],
                               env={"CODEUP_SECRET": marker})
    deadline = time.time() + 30
    while not any(marker in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"])):
        assert time.time() < deadline, "the bystander never showed up"
        time.sleep(0.1)
    yield marker
    process.kill()
    process.wait()


def search_proc(marker: str) -> str:
    """A program that passes only if it finds `marker` in some process's cmdline or environ (the
    marker split in two: its own source never holds it)."""
    half = len(marker) // 2
    return textwrap.dedent(f"""
        import os
        wanted = {marker[:half]!r} + {marker[half:]!r}
        found = []
        for pid in os.listdir('/proc'):
            for what in ('cmdline', 'environ'):
                try:
                    with open(f'/proc/{{pid}}/{{what}}', 'rb') as f:
                        if wanted.encode() in f.read():
                            found.append(pid + '/' + what)
                except OSError:
                    pass
        assert found, 'nothing found'
        print('FOUND', found)
    """)


OWN_PROCESSES_ONLY = textwrap.dedent("""
    import os
    pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
    # PID 1 is the program itself (its PID namespace's first process); nothing of the host shows.
    assert pids == [1], pids
    assert b'program.py' in open('/proc/1/cmdline', 'rb').read()
    assert os.getpid() == 1
""")


@pytest.mark.skipif(isolation() == "rlimits", reason="needs root (namespaces) or bubblewrap")
def test_a_program_cannot_read_another_process_command_line_or_environment(bystander):
    spy, own = run_programs([search_proc(bystander), OWN_PROCESSES_ONLY], workers=2, progress=False)
    assert not spy.passed and "nothing found" in spy.message, spy.message
    assert bystander not in spy.message
    assert own.passed, own.message  # it does have a /proc: its own


@pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap is not installed (apt-get install bubblewrap)")
def test_bubblewrap_mode_also_gives_a_fresh_proc(bystander, monkeypatch):
    monkeypatch.setattr(sandbox, "probe_isolation", lambda: "bubblewrap")  # as for a user who is not root
    few_processes = ("import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                     "assert len(pids) <= 3, pids  # bwrap's own init, the program\n")
    spy, own = run_programs([search_proc(bystander), few_processes], workers=1, progress=False)
    assert not spy.passed and "nothing found" in spy.message, spy.message
    assert own.passed, own.message


def test_the_search_would_find_the_marker_without_a_sandbox(bystander, tmp_path):
    """The control: the same program, run plainly, finds the bystander (the test means something)."""
    (tmp_path / "spy.py").write_text(search_proc(bystander))
    plain = subprocess.run(["/usr/bin/python3", str(tmp_path / "spy.py")], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0 and "FOUND" in plain.stdout, plain.stderr


LAUNCH_WITH_A_FAILING_REMOUNT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {root!r})
    from utils.eval import sandbox
    real = sandbox.mount_points
    # A mount that cannot be remounted read-only (it does not exist): the program must not start.
    sandbox.mount_points = lambda: (*real(), (b'/nonexistent-codeup-mount', 0))
    work = {work!r}
    request = {{"argv": ["/bin/sh", "-c", "echo ran > " + work + "/ran"], "cwd": work, "env": {{"PATH": "/usr/bin:/bin"}},
               "stdout": work + "/out", "stderr": work + "/err", "uid": None, "gid": 65534, "namespaces": True,
               "writable": [work], "timeout": 30, "rlimits": {{}}}}
    print(json.dumps(sandbox.launch(request)))
""")


@needs_root
def test_a_failing_remount_stops_the_program(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    # Its input stays open while the step runs (the launcher reads its end as the harness leaving).
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCH_WITH_A_FAILING_REMOUNT.format(root=str(ROOT), work=str(work))],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = launcher.stdout.readline()
    launcher.stdin.close()
    assert launcher.wait(timeout=120) == 0 and line, line
    reply = json.loads(line)
    assert reply == {"returncode": 127, "timed_out": False}
    error = (work / "err").read_text()
    assert "remount /nonexistent-codeup-mount read-only" in error, error
    assert not (work / "ran").exists()  # the program never ran


def test_make_file_system_read_only_raises_on_a_mount_it_cannot_remount(tmp_path):
    """The function itself, in a child with a mount namespace of its own (root)."""
    if os.geteuid() != 0:
        pytest.skip("mount namespaces need root")
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(ROOT)!r})
        from utils.eval import sandbox
        sandbox.check(sandbox.libc().unshare(sandbox.CLONE_NEWNS), "unshare")
        try:
            sandbox.make_file_system_read_only([{str(tmp_path)!r}], ((b"/nonexistent-codeup-mount", 0),))
        except OSError as error:
            print("refused:", error)
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert "refused: " in child.stdout and "remount /nonexistent-codeup-mount read-only" in child.stdout, child.stderr


# ---- uids ---------------------------------------------------------------------------------------

HOLD_A_BLOCK = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    os.getpid = lambda: 4242  # the same pid modulo 4096 for both: the old scheme gave them the same uids
    from utils.eval import sandbox
    print(sandbox.uid_block(), flush=True)
    sys.stdin.read()  # held until the test closes our input
""")


@needs_root
def test_two_harnesses_with_the_same_pid_modulo_never_share_uids_and_free_them_at_exit():
    holders = [subprocess.Popen([sys.executable, "-c", HOLD_A_BLOCK.format(root=str(ROOT))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        blocks = [int(holder.stdout.readline()) for holder in holders]
    finally:
        for holder in holders:
            holder.stdin.close()
            holder.wait(timeout=60)
    assert blocks[0] != blocks[1]
    assert not set(sandbox.block_uids(blocks[0])) & set(sandbox.block_uids(blocks[1]))
    for block in blocks:  # both ended: their blocks are free again
        descriptor = os.open(sandbox.UID_REGISTRY / str(block), os.O_RDWR)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises if still held
        finally:
            os.close(descriptor)
    info = os.stat(sandbox.UID_REGISTRY)
    assert info.st_uid == 0 and info.st_mode & 0o077 == 0  # root's alone


def test_a_registry_that_others_can_write_is_refused(tmp_path, monkeypatch):
    loose = tmp_path / "registry"
    loose.mkdir()
    os.chmod(loose, 0o777)
    monkeypatch.setattr(sandbox, "UID_REGISTRY", loose)
    with pytest.raises(OSError, match="mode 700"):
        sandbox.uid_registry()


def harness_uids(pid: int) -> range:
    """Every uid the sandbox of harness process `pid` may run programs as: the block whose file in
    the registry records that pid (empty until the harness claims one)."""
    try:
        for entry in os.scandir(sandbox.UID_REGISTRY):
            with open(entry.path, "rb") as file:
                if file.read().strip() == str(pid).encode():
                    return sandbox.block_uids(int(entry.name))
    except OSError:
        pass
    return range(0)


def run_evaluate_in_background(*args):
    return subprocess.Popen([sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_uids(process) -> range:
    deadline = time.time() + 300
    while not (uids := harness_uids(process.pid)):
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.time() < deadline, "the harness never claimed its uids"
        time.sleep(0.1)
    return uids


@needs_root
@pytest.mark.slow
def test_two_evaluations_at_once_one_full_of_fork_bombs(tmp_path):
    """They run at the same time under uids of their own, and the bombs leave the other's scores right."""
    bomb = "    import os\n    while True:\n        try:\n            os.fork()\n        except OSError:\n            pass\n"
    bombs = tmp_path / "bombs.jsonl"
    bombs.write_text("".join(json.dumps({"task_id": "HumanEval/0", "completion": bomb}) + "\n" for _ in range(10)))
    problems = load_humaneval()[:20]
    right = tmp_path / "right.jsonl"
    right.write_text("".join(json.dumps({"task_id": p["task_id"], "completion": p["canonical_solution"]}) + "\n"
                             for p in problems))
    bomber = run_evaluate_in_background("--samples_file", bombs, "--limit", 1, "--timeout", 3, "--workers", 2,
                                        "--output_dir", tmp_path / "bombs")
    try:
        bomber_uids = wait_for_uids(bomber)
        honest = run_evaluate_in_background("--samples_file", right, "--limit", 20, "--timeout", 30, "--workers", 2,
                                            "--output_dir", tmp_path / "right")
        honest_uids = wait_for_uids(honest)
        assert bomber.poll() is None  # both hold their uids at the same time
        _, honest_errors = honest.communicate(timeout=900)
        assert honest.returncode == 0, honest_errors[-3000:]
    finally:
        _, bomber_errors = bomber.communicate(timeout=900)
    assert bomber.returncode == 0, bomber_errors[-3000:]
    assert not set(bomber_uids) & set(honest_uids)
    scores = json.loads((tmp_path / "right" / "humaneval_results.json").read_text())
    assert scores["pass@1"] == 1.0 and scores["passed"] == 20
    bombed = json.loads((tmp_path / "bombs" / "humaneval_results.json").read_text())
    assert bombed["passed"] == 0 and bombed["samples"] == 10


# ---- no sandbox, no model code -------------------------------------------------------------------

def test_without_root_or_bubblewrap_evaluation_refuses_unless_allowed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "probe_isolation", lambda: "rlimits")  # as without root and bwrap
    problem = load_humaneval()[0]
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"task_id": problem["task_id"], "completion": problem["canonical_solution"]}) + "\n")
    with pytest.raises(SystemExit) as refused:
        run_cli(evaluate.main, ["--samples_file", str(samples), "--limit", "1", "--output_dir", str(tmp_path / "no")])
    assert refused.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("error: no sandbox on this machine") and "--allow_unsandboxed" in lines[-1]
    assert not (tmp_path / "no").exists()  # nothing ran, nothing written
    run_cli(evaluate.main, ["--samples_file", str(samples), "--limit", "1", "--output_dir", str(tmp_path / "yes"),
                            "--allow_unsandboxed"])
    assert "warning: --allow_unsandboxed" in capsys.readouterr().err
    results = json.loads((tmp_path / "yes" / "humaneval_results.json").read_text())
    assert results["passed"] == 1 and results["settings"]["isolation"] == "rlimits"
