"""Run untrusted programs (model-written code, in any language) safely: each in its own subprocesses.

A `Job` is a few source files, an optional compile step and a run step. Every job gets a fresh temp
directory as its working directory and home; each step gets its own wall-clock timeout and resource
limits (CPU seconds, address space, file size, process count, no core files; compilers get more
than programs), an environment with nothing inherited (no secrets), stdin closed, stdout/stderr
captured into capped files, and its whole process group killed at the end.

When the harness runs as root, the program never does: it runs under a uid of its own from a
reserved range (one per worker slot, see `sandbox_uid`) inside new PID and network namespaces
(`unshare`), so it sees no network, cannot signal the harness, every process it started dies with
it, it sees the whole file system read-only but for its own folder (a mount namespace), and the
process limit (which the kernel counts per uid) is its own: a fork bomb in one worker
cannot starve the programs of the others. As another user, bubblewrap (`bwrap`) gives the same
namespaces plus a read-only view of the file system when it is installed.

A program passes only if it runs to its very end: each language appends code that writes a random
token to a file (`RESULT_FILE`) after the tests, so exiting 0 before the asserts is a failure.
"""

import atexit
import ctypes
import functools
import os
import queue
import re
import resource
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

NOBODY_UID = NOBODY_GID = 65534
RESULT_FILE = ".codeup_result"
# Programs run as uids SANDBOX_UID_BASE + 256 * (harness pid % 4096) + slot, and their compilers as that
# + 128 (at most 128 slots): no account uses them, and two evaluations running at once (different pids) get different uids.
SANDBOX_UID_BASE = 3_000_000
SLOTS_PER_HARNESS = 128
# What programs may run: Debian's tools; never the venv's interpreter (it may live in root's home).
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass(frozen=True)
class Limits:
    timeout: float = 3.0  # wall-clock seconds
    memory_mb: int = 1024  # address space
    file_size_mb: int = 16  # the largest file it may write, its captured output included
    processes: int = 64  # processes and threads of the sandbox uid
    output_bytes: int = 4096  # how much of stdout/stderr the result keeps


@dataclass(frozen=True)
class Step:
    command: list[str]
    limits: Limits
    environment: dict = field(default_factory=dict)  # added to the clean environment


@dataclass(frozen=True)
class Job:
    """Files written into a fresh directory, then `compile` (may be None), then `run`. The program
    passes when `run` exits 0 having written `token` into RESULT_FILE (its last act)."""
    files: dict
    run: Step
    token: str
    compile: Step | None = None


@dataclass
class Outcome:
    passed: bool
    status: str  # passed, failed, timeout, compile error
    message: str  # why it failed: the end of stderr, or the exit status
    seconds: float


@functools.cache
def python_interpreter() -> str:
    """The Python that runs Python programs: the system's (readable by any uid) when there is one."""
    return shutil.which("python3", path=SANDBOX_PATH) or sys.executable


# Mount flags (linux/mount.h) for the read-only view of the file system.
CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                      "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}


@functools.cache
def mount_points() -> tuple[tuple[bytes, int], ...]:
    """(mount point, its flags) of every mount, the ones a program must not write to."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # \040 is a space
        if point == b"/dev" or point.startswith((b"/dev/pts", b"/proc", b"/sys")):
            continue  # device nodes (/dev/null) stay usable; /proc and /sys are the kernel's, root-only to write
        flags = sum(MOUNT_OPTION_FLAGS.get(option, 0) for option in fields[5].split(","))
        points.append((point, flags))
    return tuple(points)


def make_file_system_read_only(writable: list[str], points: tuple = ()) -> None:
    """In the child, before exec (as root): a mount namespace of its own where everything is
    read-only but `writable` (the job's folder), so a program cannot write outside it, not even
    into /tmp or /dev/shm. The namespace (and these mounts) go away with the program."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "mount --make-rprivate /")
    for path in writable:  # a mount of its own, so making its parent read-only leaves it writable
        if libc.mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None) != 0:
            raise OSError(ctypes.get_errno(), f"bind {path}")
    keep = {path.encode() for path in writable}
    for point, flags in points:  # read in the parent: the child's list would hold the binds above
        if point not in keep:
            libc.mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None)
    os.chdir(writable[0])  # the working directory, through the writable bind (not the folder beneath it)


@functools.cache
def isolation() -> str:
    """How programs are isolated on this machine: namespaces (root), bubblewrap, or rlimits only."""
    probe = [python_interpreter(), "-c", "pass"]
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("setpriv"):
        with tempfile.TemporaryDirectory() as folder:
            points = mount_points()
            try:
                if subprocess.run(namespace_prefix(sandbox_uid(0)) + probe, capture_output=True, timeout=60,
                                  preexec_fn=lambda: make_file_system_read_only([folder], points)).returncode == 0:
                    return "namespaces"
            except subprocess.SubprocessError:
                pass  # no mount namespaces here
    if shutil.which("bwrap"):
        if subprocess.run(bubblewrap_prefix(tempfile.gettempdir()) + probe, capture_output=True, timeout=60).returncode == 0:
            return "bubblewrap"
    return "rlimits"


def sandbox_uid(slot: int, compiler: bool = False) -> int:
    """The uid of worker slot `slot`: its own process budget, files and signals. Compilers run as
    another uid, so a program cannot tamper with the build cache its slot's later programs use."""
    return (SANDBOX_UID_BASE + 2 * SLOTS_PER_HARNESS * (os.getpid() % 4096) + slot % SLOTS_PER_HARNESS
            + (SLOTS_PER_HARNESS if compiler else 0))


def harness_uids(pid: int | None = None) -> range:
    """Every uid the sandbox of harness process `pid` (default: this one) may run programs as."""
    first = SANDBOX_UID_BASE + 2 * SLOTS_PER_HARNESS * ((os.getpid() if pid is None else pid) % 4096)
    return range(first, first + 2 * SLOTS_PER_HARNESS)


_slot_caches: dict = {}
_slot_caches_lock = threading.Lock()


def slot_cache(slot: int, uid: int | None) -> str:
    """A folder that the compile steps of one worker slot share for this whole run (Go's build
    cache: warm, a Go test compiles in half a second instead of five); owned by the slot's
    compiler uid, removed at exit."""
    with _slot_caches_lock:
        if "root" not in _slot_caches:
            _slot_caches["root"] = tempfile.mkdtemp(prefix="codeup-slot-caches-")
            os.chmod(_slot_caches["root"], 0o711)
            atexit.register(shutil.rmtree, _slot_caches["root"], True)
        if slot not in _slot_caches:
            folder = Path(_slot_caches["root"]) / str(slot)
            folder.mkdir(mode=0o700)
            if uid is not None:
                os.chown(folder, uid, NOBODY_GID)
            _slot_caches[slot] = str(folder)
        return _slot_caches[slot]


def namespace_prefix(uid: int) -> list[str]:
    # New PID namespace (the program is PID 1's child tree; all die with it) and a network
    # namespace with only a loopback that is down; then drop to the slot's uid with no capabilities.
    return ["unshare", "--pid", "--net", "--fork", "--kill-child",
            "setpriv", f"--reuid={uid}", f"--regid={NOBODY_GID}", "--clear-groups", "--no-new-privs"]


def bubblewrap_prefix(work_dir: str) -> list[str]:
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", work_dir, work_dir,
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", work_dir]


def limit_resources(limits: Limits, drop_to_uid: int | None, writable: list[str] | None = None):
    """Runs in the child between fork and exec: own session (process group), resource limits,
    (namespaces) a read-only file system but for `writable`, and (root without namespaces) the
    switch to the slot's uid."""
    points = mount_points() if writable else ()

    def apply():
        os.setsid()
        if writable:
            make_file_system_read_only(writable, points)
        cpu = int(limits.timeout) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = limits.memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = limits.file_size_mb * 2**20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_NPROC, (limits.processes, limits.processes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if drop_to_uid is not None:
            os.setgroups([])
            os.setgid(NOBODY_GID)
            os.setuid(drop_to_uid)
    return apply


def python_job(code: str, limits: Limits = Limits()) -> Job:
    """A Python program run as it is, with the line that writes the token appended."""
    token = secrets.token_hex(16)
    source = (f"{code}\n\nwith open({RESULT_FILE!r}, 'w') as _codeup_result:\n"
              f"    _codeup_result.write({token!r})\n")
    run = Step([python_interpreter(), "-I", "program.py"], limits,
               {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"})
    return Job({"program.py": source}, run, token)


def run_step(step: Step, work_dir: str, uid: int | None, mode: str, log_name: str, slot: int = 0) -> tuple[int | None, bool, str]:
    """One command in the sandbox: (exit status or None, timed out, the end of its stderr)."""
    work = Path(work_dir)
    prefix = {"namespaces": namespace_prefix(uid) if uid is not None else [],
              "bubblewrap": bubblewrap_prefix(work_dir)}.get(mode, [])
    drop_to_uid = uid if mode == "rlimits" and uid is not None else None
    environment = {"PATH": SANDBOX_PATH, "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8", **step.environment}
    writable = [work_dir] if mode == "namespaces" else None
    if any("{slot_cache}" in value for value in environment.values()):
        cache = slot_cache(slot, uid)
        environment = {name: value.replace("{slot_cache}", cache) for name, value in environment.items()}
        writable = writable and writable + [cache]
    with open(work / f".{log_name}.out", "wb") as stdout, open(work / f".{log_name}.err", "wb") as stderr:
        if uid is not None:
            os.chown(stdout.name, uid, NOBODY_GID)
            os.chown(stderr.name, uid, NOBODY_GID)
        process = subprocess.Popen(
            prefix + step.command, cwd=work_dir, env=environment, stdin=subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, preexec_fn=limit_resources(step.limits, drop_to_uid, writable),
        )
        try:
            returncode, timed_out = wait_for(process, step.limits.timeout)
        finally:
            kill_group(process)
    output = (work / f".{log_name}.err").read_bytes()[-step.limits.output_bytes:]
    if not output.strip():  # some harnesses (go test, javac) report on stdout
        output = (work / f".{log_name}.out").read_bytes()[-step.limits.output_bytes:]
    return returncode, timed_out, output.decode("utf-8", errors="replace").strip()


def wait_for(process: subprocess.Popen, timeout: float) -> tuple[int | None, bool]:
    """(exit status, timed out), noticed the moment the process ends: Popen.wait(timeout) polls
    with sleeps of up to 50 ms, which for short programs costs more than running them."""
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): Popen's polling wait
        try:
            return process.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            return None, True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        if not poller.poll(max(1, int(timeout * 1000))):
            return None, True
        return process.wait(), False
    finally:
        os.close(pidfd)


def give_to(work: Path, uid: int | None) -> None:
    """Make the job's folder and everything in it belong to `uid` (compiler, then program)."""
    if uid is None:
        return
    for path in [work, *work.rglob("*")]:
        os.chown(path, uid, NOBODY_GID, follow_symlinks=False)


def last_line(text: str, returncode: int | None) -> str:
    # The last line that says something (node ends its error reports with its version).
    # The last line that names an error (SomethingError: ..., Exception in ...); else the last one
    # that is not indented (stack frames are); else the last line.
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("Node.js v")]
    errors = [line for line in lines if re.match(r"[\w.$]*(?:Error|Exception)\b", line)]
    unindented = [line for line in lines if not line[0].isspace()]
    return (errors or unindented or lines)[-1] if lines else f"exit status {returncode}"


def run_job(job: Job, slot: int = 0) -> Outcome:
    """Compile (when the job has a compile step), then run; it passes when the run exits 0 having
    run to its last line."""
    mode = isolation()
    as_root = os.geteuid() == 0 and mode != "bubblewrap"
    uid = sandbox_uid(slot) if as_root else None
    compiler_uid = sandbox_uid(slot, compiler=True) if as_root else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="codeup-sandbox-") as work_dir:
        work = Path(work_dir)
        for name, text in job.files.items():
            (work / name).write_text(text, encoding="utf-8")
        if job.compile is not None:
            give_to(work, compiler_uid)
            returncode, timed_out, error_tail = run_step(job.compile, work_dir, compiler_uid, mode, "compile", slot)
            if timed_out or returncode != 0:
                message = (f"compile timed out after {job.compile.limits.timeout:g} s" if timed_out
                           else last_line(error_tail, returncode))
                return Outcome(False, "compile error", message[: job.compile.limits.output_bytes],
                               time.perf_counter() - started)
        give_to(work, uid)
        returncode, timed_out, error_tail = run_step(job.run, work_dir, uid, mode, "run", slot)
        result = work / RESULT_FILE
        finished = result.is_file() and not result.is_symlink() and result.read_text(errors="replace") == job.token
    seconds = time.perf_counter() - started
    if timed_out:
        return Outcome(False, "timeout", f"timed out after {job.run.limits.timeout:g} s", seconds)
    if returncode == 0 and finished:
        return Outcome(True, "passed", "passed", seconds)
    if returncode == 0:
        message = "exited before the end of the tests"
    elif returncode < 0:
        # A program runs as PID 1 of its namespace, where abort()'s SIGABRT is ignored and glibc
        # falls back to a crash: what it printed (e.g. "Assertion ... failed") says more.
        message = f"killed by {signal.Signals(-returncode).name}"
        if error_tail:
            message += f": {last_line(error_tail, returncode)}"
    else:
        message = last_line(error_tail, returncode)
    return Outcome(False, "failed", message[: job.run.limits.output_bytes], seconds)


def run_program(code: str, limits: Limits = Limits(), slot: int = 0) -> Outcome:
    """Run one Python program; it passes when it exits 0 having run to its last line."""
    return run_job(python_job(code, limits), slot)


def kill_group(process: subprocess.Popen) -> None:
    """Kill the program and everything it started (its session; in namespaces, the whole PID namespace)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def run_programs(programs: list, limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True) -> list[Outcome]:
    """Run many programs (Python source strings, or Jobs), `workers` at a time (threads waiting on
    subprocesses). Each worker holds a slot, hence a uid of its own, for the program it runs."""
    workers = max(1, min(workers or os.cpu_count() or 1, SLOTS_PER_HARNESS))
    jobs = [python_job(p, limits) if isinstance(p, str) else p for p in programs]
    free_slots = queue.SimpleQueue()
    for slot in range(workers):
        free_slots.put(slot)

    def run_in_a_slot(job: Job) -> Outcome:
        slot = free_slots.get()
        try:
            return run_job(job, slot)
        finally:
            free_slots.put(slot)

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(jobs), desc="Executing", unit="program", disable=not progress) as bar:
        futures = [pool.submit(run_in_a_slot, job) for job in jobs]
        outcomes = []
        for future in futures:
            outcomes.append(future.result())
            bar.update(1)
    return outcomes
