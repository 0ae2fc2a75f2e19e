"""Run untrusted Python programs (model-written code) safely: each in its own subprocess.

Every program gets a fresh temp directory as its working directory and home, a wall-clock timeout,
resource limits (CPU seconds, address space, file size, process count, no core files), an
environment with no inherited variables (no secrets), stdin closed, stdout/stderr captured into
capped files, and its whole process group killed at the end. When the harness runs as root, the
program never does: it runs as `nobody` (root would ignore the process-count limit) inside new
PID and network namespaces (`unshare`), so it sees no network, cannot signal the harness, and
every process it started dies with it. As another user, bubblewrap (`bwrap`) gives the same
namespaces plus a read-only view of the file system when it is installed.

A program passes only if it runs to its very end: the harness appends a line that writes a
random token to a file, so `sys.exit(0)` before the asserts is a failure, not a pass.
"""

import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

NOBODY_UID = NOBODY_GID = 65534
RESULT_FILE = ".codeup_result"


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    file_size_mb: int = 16  # the largest file it may write, its captured output included
    processes: int = 64  # processes and threads of the sandbox user
    output_bytes: int = 4096  # how much of stdout/stderr the result keeps


@dataclass
class Outcome:
    passed: bool
    status: str  # passed, failed, timeout
    message: str  # why it failed: the end of stderr, or the exit status
    seconds: float


@functools.cache
def isolation() -> str:
    """How programs are isolated on this machine: namespaces (root), bubblewrap, or rlimits only."""
    probe = [sys.executable, "-c", "pass"]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv"):
        if subprocess.run(namespace_prefix() + probe, capture_output=True, timeout=60).returncode == 0:
            return "namespaces"
    if shutil.which("bwrap"):
        if subprocess.run(bubblewrap_prefix(tempfile.gettempdir()) + probe, capture_output=True, timeout=60).returncode == 0:
            return "bubblewrap"
    return "rlimits"


def namespace_prefix() -> list[str]:
    # New PID namespace (the program is PID 1's child tree; all die with it) and a network
    # namespace with only a loopback that is down; then drop to nobody with no capabilities.
    return ["unshare", "--pid", "--net", "--fork", "--kill-child",
            "setpriv", f"--reuid={NOBODY_UID}", f"--regid={NOBODY_GID}", "--clear-groups", "--no-new-privs"]


def bubblewrap_prefix(work_dir: str) -> list[str]:
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", work_dir, work_dir,
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", work_dir]


def limit_resources(limits: Limits, drop_root: bool):
    """Runs in the child between fork and exec: own session (process group), resource limits, and
    (root without namespaces) the switch to nobody."""
    def apply():
        os.setsid()
        cpu = int(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_size_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_root:
            os.setgroups([])
            os.setgid(NOBODY_GID)
            os.setuid(NOBODY_UID)
    return apply


def run_program(code: str, limits: Limits = Limits()) -> Outcome:
    """Run one program; it passes when it exits 0 having run to its last line."""
    token = secrets.token_hex(16)
    mode = isolation()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="codeup-sandbox-") as work_dir:
        work = Path(work_dir)
        (work / "program.py").write_text(
            f"{code}\n\nwith open({RESULT_FILE!r}, 'w') as _codeup_result:\n    _codeup_result.write({token!r})\n",
            encoding="utf-8",
        )
        prefix = {"namespaces": namespace_prefix(), "bubblewrap": bubblewrap_prefix(work_dir)}.get(mode, [])
        drop_root = mode == "rlimits" and os.geteuid() == 0
        if mode == "namespaces" or drop_root:
            os.chown(work, NOBODY_UID, NOBODY_GID)
        environment = {"PATH": "/usr/bin:/bin", "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8",
                       "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        with open(work / "stdout", "wb") as stdout, open(work / "stderr", "wb") as stderr:
            process = subprocess.Popen(
                prefix + [sys.executable, "-I", "program.py"], cwd=work_dir, env=environment,
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, preexec_fn=limit_resources(limits, drop_root),
            )
            try:
                returncode, timed_out = process.wait(timeout=limits.timeout), False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                kill_group(process)
        finished = (work / RESULT_FILE).is_file() and (work / RESULT_FILE).read_text(errors="replace") == token
        error_tail = (work / "stderr").read_bytes()[-limits.output_bytes:].decode("utf-8", errors="replace").strip()
    seconds = time.perf_counter() - started
    if timed_out:
        return Outcome(False, "timeout", f"timed out after {limits.timeout:g} s", seconds)
    if returncode == 0 and finished:
        return Outcome(True, "passed", "passed", seconds)
    if returncode == 0:
        message = "exited before the end of the tests"
    elif returncode < 0:
        message = f"killed by {signal.Signals(-returncode).name}"
    else:
        message = error_tail.splitlines()[-1] if error_tail else f"exit status {returncode}"
    return Outcome(False, "failed", message[: limits.output_bytes], seconds)


def kill_group(process: subprocess.Popen) -> None:
    """Kill the program and everything it started (its session; in namespaces, the whole PID namespace)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_programs(codes: list[str], limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True) -> list[Outcome]:
    """Run many programs, `workers` at a time (threads waiting on subprocesses)."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(codes), desc="Executing", unit="program", disable=not progress) as bar:
        futures = [pool.submit(run_program, code, limits) for code in codes]
        outcomes = []
        for future in futures:
            outcomes.append(future.result())
            bar.update(1)
    return outcomes
