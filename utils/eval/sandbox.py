"""Run untrusted programs (model-written code, in any language) safely: each in its own subprocesses.

A `Job` is a few source files, an optional compile step and a run step. Every job gets a fresh temp
directory as its working directory and home; each step gets its own wall-clock timeout and resource
limits (CPU seconds, address space, file size, process count, no core files; compilers get more
than programs), an environment with nothing inherited (no secrets), stdin closed, stdout/stderr
captured into capped files, and its whole process group killed at the end.

When the harness runs as root, the program never does: it runs under a uid of its own from a
reserved range (one per worker slot, see `sandbox_uid`; each harness holds a block of uids of its
own, claimed in a root-only registry, see `uid_block`) inside new PID, network and mount
namespaces, so it sees no network, cannot signal the harness, every process it started dies with
it, it sees the whole file system read-only but for its own folder, a /proc of its own (its own
processes only: never another program's command line or environment), and the process limit
(which the kernel counts per uid) is its own: a fork bomb in one worker cannot starve the programs
of the others. A mount that cannot be made read-only stops the program before it starts. As
another user, bubblewrap (`bwrap`) gives the same namespaces, a fresh /proc and a read-only view
of the file system when it is installed. Without either only rlimits are left, and evaluate.py
refuses to run model code that way unless told to (--allow_unsandboxed).

Programs are not started by the harness itself but by a launcher per worker slot: this file run as
a small process of its own (see "The launcher" below), because forking the harness, which has
torch imported, costs more than running a short program.

A program passes only if it runs to its very end: each language appends code that writes a random
token to a file (`RESULT_FILE`) after the tests, so exiting 0 before the asserts is a failure.
"""

import atexit
import ctypes
import fcntl
import functools
import json
import os
import queue
import re
import resource
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

NOBODY_GID = 65534  # nogroup: the group the sandbox uids run as and own their files with
RESULT_FILE = ".codeup_result"
# Programs run as uids SANDBOX_UID_BASE + 256 * block + slot, and their compilers as that + 128 (at
# most 128 slots): no account uses them. `block` is the harness's own: claimed in UID_REGISTRY (a
# root-only folder; a file per block, locked by the harness that holds it, freed when it ends), so
# two evaluations running at once never share a uid.
SANDBOX_UID_BASE = 3_000_000
SLOTS_PER_HARNESS = 128
UID_BLOCKS = 4096
UID_REGISTRY = Path("/run/codeup-sandbox-uids")
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


# Namespace, mount and prctl constants (linux/sched.h, linux/mount.h, linux/prctl.h).
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC, MS_PRIVATE, MS_RELATIME = 32, 1024, 2048, 4096, 16384, 1 << 18, 1 << 21
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                      "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38


@functools.cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def mount_points() -> tuple[tuple[bytes, int], ...]:
    """(mount point, its flags) of every mount, the ones a program must not write to. Read in each
    program's fresh mount namespace, so the list is never stale."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        point = fields[4].encode().decode("unicode_escape").encode("latin-1")  # \040 is a space
        if point == b"/dev" or point.startswith((b"/dev/pts", b"/proc", b"/sys")):
            continue  # device nodes (/dev/null) stay usable; /proc and /sys are the kernel's, root-only to write
        flags = sum(MOUNT_OPTION_FLAGS.get(option, 0) for option in fields[5].split(","))
        points.append((point, flags))
    return tuple(points)


def make_file_system_read_only(writable: list[str], points: tuple) -> None:
    """In a fresh mount namespace (as root): everything read-only but `writable` (the job's
    folder), so a program cannot write outside it, not even into /tmp or /dev/shm. The namespace
    (and these mounts) go away with the program."""
    check(libc().mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "mount --make-rprivate /")
    for path in writable:  # a mount of its own, so making its parent read-only leaves it writable
        check(libc().mount(path.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"bind {path}")
    keep = {path.encode() for path in writable}
    for point, flags in points:  # read before the binds above, which would be in the list
        if point not in keep:  # one that fails stops the program: never less isolation than reported
            check(libc().mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None),
                  f"remount {point.decode(errors='replace')} read-only")


def mount_fresh_proc() -> None:
    """In the program's new PID and mount namespaces (as root): a /proc of that PID namespace over
    the host's, so it lists the program's own processes only."""
    check(libc().mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "mount a fresh /proc")


_isolation_lock = threading.Lock()


def isolation() -> str:
    """How programs are isolated on this machine: namespaces (root), bubblewrap, or rlimits only."""
    with _isolation_lock:  # probed once: workers asking at once wait for that probe
        return probe_isolation()



def require_a_sandbox(allow_unsandboxed: bool) -> None:
    """The policy of every stage that runs model-written code (evaluate.py, finetune_rl.py): in
    namespaces (root) or bubblewrap; with resource limits only, not unless the user asks."""
    from utils.errors import CodeUpError  # here: the launcher runs this file with the standard library only
    from utils.logs import logger

    if isolation() != "rlimits":
        return
    if not allow_unsandboxed:
        raise CodeUpError("no sandbox on this machine (not root, and no bubblewrap): model-written code would run as "
                          "you, with your files and the network; run as root or install bubblewrap (apt-get install "
                          "bubblewrap), or pass --allow_unsandboxed to run it with resource limits only")
    logger.warning("--allow_unsandboxed: the programs run as you, with your files and the network "
                   "(resource limits only)")

@functools.cache
def probe_isolation() -> str:
    probe = Step([python_interpreter(), "-c", "pass"], Limits(timeout=60.0))
    if os.geteuid() == 0:
        with tempfile.TemporaryDirectory() as folder:
            try:
                returncode, _, _ = run_step(probe, work_dir=folder, uid=sandbox_uid(0), mode="namespaces", log_name="probe")
                if returncode == 0:
                    return "namespaces"
            except OSError:
                pass  # the launcher could not start (cannot happen on Linux): no namespaces either
    if shutil.which("bwrap"):
        if subprocess.run(bubblewrap_prefix(tempfile.gettempdir()) + probe.command, capture_output=True, timeout=60).returncode == 0:
            return "bubblewrap"
    return "rlimits"


def sandbox_uid(slot: int, compiler: bool = False) -> int:
    """The uid of worker slot `slot`: its own process budget, files and signals. Compilers run as
    another uid, so a program cannot tamper with the build cache its slot's later programs use."""
    return block_uids(uid_block())[slot % SLOTS_PER_HARNESS + (SLOTS_PER_HARNESS if compiler else 0)]


def block_uids(block: int) -> range:
    """The uids of a block: its program uids (one per slot), then its compiler uids."""
    first = SANDBOX_UID_BASE + 2 * SLOTS_PER_HARNESS * block
    return range(first, first + 2 * SLOTS_PER_HARNESS)


_uid_block: list = []
_uid_block_lock = threading.Lock()


def uid_block() -> int:
    """This harness's block of uids, claimed once and held until the process ends."""
    with _uid_block_lock:
        if not _uid_block:
            _uid_block.extend(claim_uid_block())
        return _uid_block[0]


def uid_registry() -> Path:
    """UID_REGISTRY, made if missing; refused unless it is root's own folder that nobody else can
    write to (another user could otherwise hold or fake blocks)."""
    try:
        os.mkdir(UID_REGISTRY, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(UID_REGISTRY)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != 0 or info.st_mode & 0o077:
        raise OSError(f"{UID_REGISTRY} must be a folder of root's that only root can open (mode 700)")
    return UID_REGISTRY


def claim_uid_block() -> tuple[int, int]:
    """(block, the descriptor that holds it): the first block whose file in the registry no other
    process has locked. The lock (flock) stays while the descriptor is open, that is until this
    process ends, however it ends: then the block is free for the next harness. The file records
    the holder's pid, which tells whose a block is."""
    folder = uid_registry()
    start = os.getpid() % UID_BLOCKS  # where the search starts; the lock decides
    for offset in range(UID_BLOCKS):
        block = (start + offset) % UID_BLOCKS
        descriptor = os.open(folder / str(block), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            continue
        os.ftruncate(descriptor, 0)
        os.write(descriptor, str(os.getpid()).encode())
        return block, descriptor
    raise OSError(f"all {UID_BLOCKS} blocks of sandbox uids are held by running harnesses")


_slot_caches: dict = {}
_slot_caches_lock = threading.Lock()


def slot_cache(slot: int, uid: int | None) -> str:
    """A folder that the compile steps of one worker slot share for this whole run (Go's build
    cache: warm, a Go test compiles many times faster than cold); owned by the slot's compiler uid,
    removed at exit."""
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


def bubblewrap_prefix(work_dir: str) -> list[str]:
    return ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", work_dir, work_dir,
            "--unshare-all", "--die-with-parent", "--new-session", "--chdir", work_dir]


def python_job(code: str, limits: Limits = Limits()) -> Job:
    """A Python program run as it is, with the line that writes the token appended."""
    token = secrets.token_hex(16)
    source = (f"{code}\n\nwith open({RESULT_FILE!r}, 'w') as _codeup_result:\n"
              f"    _codeup_result.write({token!r})\n")
    run = Step([python_interpreter(), "-I", "program.py"], limits,
               {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"})
    return Job({"program.py": source}, run, token)


def run_step(step: Step, *, work_dir: str, uid: int | None, mode: str, log_name: str,
             slot: int = 0) -> tuple[int | None, bool, str]:
    """One command in the sandbox, started by the slot's launcher: (exit status or None, timed
    out, the end of its stderr)."""
    work = Path(work_dir)
    environment = {"PATH": SANDBOX_PATH, "HOME": work_dir, "TMPDIR": work_dir, "LANG": "C.UTF-8", **step.environment}
    writable = [work_dir]
    if any("{slot_cache}" in value for value in environment.values()):
        cache = slot_cache(slot, uid=uid)
        environment = {name: value.replace("{slot_cache}", cache) for name, value in environment.items()}
        writable.append(cache)
    prefix = bubblewrap_prefix(work_dir) if mode == "bubblewrap" else []
    cpu_seconds = int(step.limits.timeout) + 1
    reply = launcher(slot).start({
        "argv": prefix + step.command, "cwd": work_dir, "env": environment,
        "stdout": str(work / f".{log_name}.out"), "stderr": str(work / f".{log_name}.err"),
        "uid": uid, "gid": NOBODY_GID, "namespaces": mode == "namespaces", "writable": writable,
        "timeout": step.limits.timeout,
        "rlimits": {"RLIMIT_CPU": cpu_seconds, "RLIMIT_AS": step.limits.memory_mb * 2**20,
                    "RLIMIT_FSIZE": step.limits.file_size_mb * 2**20, "RLIMIT_NPROC": step.limits.processes,
                    "RLIMIT_CORE": 0},
    })
    output = read_tail(work / f".{log_name}.err", size=step.limits.output_bytes)
    if not output.strip():  # some harnesses (go test, javac) report on stdout
        output = read_tail(work / f".{log_name}.out", size=step.limits.output_bytes)
    return reply["returncode"], reply["timed_out"], output.decode("utf-8", errors="replace").strip()


def read_tail(path: Path, size: int) -> bytes:
    """The last `size` bytes of a file the program could have replaced: never through a symlink
    (the harness reads as root)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return b""
    with open(descriptor, "rb") as file:
        file.seek(max(0, os.fstat(descriptor).st_size - size))
        return file.read(size)


def give_to(work: Path, uid: int | None) -> None:
    """Make the job's folder and everything in it belong to `uid` (compiler, then program)."""
    if uid is None:
        return
    for path in [work, *work.rglob("*")]:
        os.chown(path, uid, NOBODY_GID, follow_symlinks=False)


def failure_message(error_tail: str, returncode: int | None) -> str:
    """The one line that says why a step failed, from the end of its output: the last line that
    names an error (SomethingError: ..., Exception in ...); else the last one that is not indented
    (stack frames are); else the last line; "exit status N" when it printed nothing. Node ends its
    error reports with its version (Node.js v...): that line never counts."""
    lines = [line for line in error_tail.splitlines() if line.strip() and not line.startswith("Node.js v")]
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
            returncode, timed_out, error_tail = run_step(job.compile, work_dir=work_dir, uid=compiler_uid, mode=mode,
                                                         log_name="compile", slot=slot)
            if timed_out or returncode != 0:
                message = (f"compile timed out after {job.compile.limits.timeout:g} s" if timed_out
                           else failure_message(error_tail, returncode=returncode))
                return Outcome(False, "compile error", message[: job.compile.limits.output_bytes],
                               time.perf_counter() - started)
        give_to(work, uid)
        returncode, timed_out, error_tail = run_step(job.run, work_dir=work_dir, uid=uid, mode=mode, log_name="run", slot=slot)
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
            message += f": {failure_message(error_tail, returncode=returncode)}"
    else:
        message = failure_message(error_tail, returncode=returncode)
    return Outcome(False, "failed", message[: job.run.limits.output_bytes], seconds)


def run_programs(programs: list, limits: Limits = Limits(), workers: int | None = None,
                 progress: bool = True) -> list[Outcome]:
    """Run many programs (Python source strings, or Jobs), `workers` at a time (threads waiting on
    subprocesses). Each worker holds a slot, hence a uid of its own, for the program it runs."""
    workers = max(1, min(workers or os.cpu_count() or 1, SLOTS_PER_HARNESS))
    jobs = [python_job(p, limits=limits) if isinstance(p, str) else p for p in programs]
    free_slots = queue.SimpleQueue()
    for slot in range(workers):
        free_slots.put(slot)

    def run_in_a_slot(job: Job) -> Outcome:
        slot = free_slots.get()
        try:
            return run_job(job, slot=slot)
        finally:
            free_slots.put(slot)

    from tqdm.auto import tqdm  # here: the launcher runs this file with the standard library only

    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(jobs), desc="Executing", unit="program", disable=not progress) as bar:
        futures = [pool.submit(run_in_a_slot, job) for job in jobs]
        outcomes = []
        for future in futures:
            outcomes.append(future.result())
            bar.update(1)
    return outcomes


# ---- The launcher -------------------------------------------------------------------------------
# Starting a program takes work between fork and exec: limits, namespaces, mounts, the uid switch.
# Done by the harness (Popen's preexec_fn), that is a fork of the harness itself, and a harness with
# torch imported is large and slow to fork, many times slower than without torch and longer than a
# HumanEval program takes to run (measured: bench/RESULTS.md). So each worker slot has a launcher
# instead: this very file run as a small process of its own with the standard library only (-I -S),
# started once, that forks one child per step and makes the system calls that `unshare` and
# `setpriv` made (two execs a step fewer). It takes one JSON request per line on stdin and answers one JSON line on stdout; the
# slot's thread waits for the answer.


class Launcher:
    """The harness's end of one launcher process."""

    def __init__(self):
        # No preexec_fn here, so this Popen is a vfork + exec, cheap even from a big harness.
        self.process = subprocess.Popen([sys.executable, "-I", "-S", os.path.abspath(__file__)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={})
        self.lock = threading.Lock()

    def start(self, request: dict) -> dict:
        """Run one step; {"returncode": exit status (negative: killed by that signal) or None, "timed_out": bool}."""
        with self.lock:
            self.process.stdin.write(json.dumps(request).encode() + b"\n")
            self.process.stdin.flush()
            reply = self.process.stdout.readline()
        if not reply:
            raise OSError(f"the sandbox launcher died (exit status {self.process.wait()})")
        return json.loads(reply)

    def close(self) -> None:
        self.process.stdin.close()  # the launcher sees the end of its input and exits
        self.process.wait()


_launchers: dict = {}
_launchers_lock = threading.Lock()


def launcher(slot: int) -> Launcher:
    """The launcher of worker slot `slot`, started on first use (again if it died)."""
    with _launchers_lock:
        if slot not in _launchers or _launchers[slot].process.poll() is not None:
            if not _launchers:
                atexit.register(lambda: [each.close() for each in _launchers.values()])
            _launchers[slot] = Launcher()
        return _launchers[slot]


def serve() -> None:
    """The launcher's loop: one step at a time, until the harness closes its end (or dies)."""
    libc()  # loaded once, not in every child
    if os.geteuid() == 0:
        own_pid_namespace()
    for line in sys.stdin.buffer:
        reply = launch(json.loads(line))
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def launch(request: dict) -> dict:
    """Start one step in a child of its own, wait for it (at most its timeout), kill whatever is
    left of it, and report how it ended."""
    # Its output files, opened here as root: never through a symlink left by an earlier step.
    output_flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
    outputs = [os.open(request[name], output_flags, 0o600) for name in ("stdout", "stderr")]
    if request["uid"] is not None:
        for descriptor in outputs:
            os.fchown(descriptor, request["uid"], request["gid"])
    try:
        pid = fork_step_child(request["namespaces"])
    except OSError as error:  # no namespaces here (say, a container without the rights): the step fails
        os.write(outputs[1], f"sandbox: {error}\n".encode())
        pid = None
    if pid == 0:
        try:
            os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
            os.dup2(outputs[0], 1)
            os.dup2(outputs[1], 2)
            start_step(request)
        except BaseException as error:  # whatever went wrong, the child must not go on as the launcher
            os.write(2, f"sandbox: cannot start {request['argv'][0]}: {error}\n".encode())
        finally:
            os._exit(127)
    for descriptor in outputs:
        os.close(descriptor)
    if pid is None:
        return {"returncode": 127, "timed_out": False}
    ended = wait_for_exit(pid, timeout=request["timeout"])
    kill_session(pid)  # exited or not; in namespaces it is PID 1, whose death ends its whole namespace
    _, status = os.waitpid(pid, 0)  # reaped only now: until then nobody else can get its pid (nor its group's)
    if not ended:
        return {"returncode": None, "timed_out": True}
    return {"returncode": os.waitstatus_to_exitcode(status), "timed_out": False}


@functools.cache
def own_pid_namespace() -> int:
    return os.open("/proc/self/ns/pid", os.O_RDONLY)


def fork_step_child(namespaces: bool) -> int:
    """os.fork(), the child (namespaces) as PID 1 of a new PID namespace. Such a namespace is asked
    for before the fork and only takes effect for children (as `unshare --fork`); the launcher
    then goes back to its own, so that each step gets a fresh one."""
    if not namespaces:
        return os.fork()
    check(libc().unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    pid = -1
    try:
        pid = os.fork()
    finally:
        if pid != 0:  # the launcher (also when the fork failed), not the child
            check(libc().setns(own_pid_namespace(), CLONE_NEWPID), "setns(own PID namespace)")
    return pid


def kill_session(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # all its processes have ended
        pass


def wait_for_exit(pid: int, timeout: float) -> bool:
    """Whether the child `pid` ended within `timeout` seconds, noticed the moment it does (a
    pidfd), without reaping it. The harness closing its end also ends the wait, the step and the
    launcher."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(sys.stdin.fileno(), select.POLLIN)  # input while a step runs: only the harness going away
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfd (Linux < 5.3): look every 10 ms
        pidfd = None
    else:
        poller.register(pidfd, select.POLLIN)
    try:
        while (left := deadline - time.monotonic()) > 0:
            events = dict(poller.poll(max(1, int(left * 1000)) if pidfd is not None else 10))
            if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                return True
            if sys.stdin.fileno() in events:
                kill_session(pid)
                sys.exit(0)
        return False
    finally:
        if pidfd is not None:
            os.close(pidfd)


def start_step(request: dict) -> None:
    """In the launcher's child: its own session, then (namespaces) new network and mount
    namespaces with a read-only file system and a /proc of its own, then the limits and the slot's
    uid, then exec. Any of these failing: the child ends (127) before the program starts."""
    os.setsid()  # its own process group, which the launcher kills at the end
    if request["namespaces"]:  # the network namespace holds only a loopback that is down
        check(libc().unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare")
        make_file_system_read_only(request["writable"], points=mount_points())
        mount_fresh_proc()
    os.chdir(request["cwd"])  # after the mounts: through the writable bind, not the folder beneath it
    for name, value in request["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (value, value))
    if request["uid"] is not None:
        os.setgroups([])
        os.setresgid(request["gid"], request["gid"], request["gid"])
        os.setresuid(request["uid"], request["uid"], request["uid"])  # and with it all capabilities go
    check(libc().prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    # If the launcher dies, so does the program (and, as PID 1, its namespace). Set after the uid
    # switch, which clears it.
    check(libc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    argv = request["argv"]
    os.execvpe(argv[0], argv, request["env"])


if __name__ == "__main__":
    serve()
