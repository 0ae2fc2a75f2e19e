"""One notice channel: `warning: ...` on stderr from rank 0 only; known-harmless library notices
silenced at their source, nothing else; progress bars only where they can redraw."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from utils.logs import TENSORFLOW_IMPORT_NOTICES, logger, native_notices_dropped, progress_bars_wanted

ROOT = Path(__file__).resolve().parents[1]


def test_warnings_print_once_from_rank_zero(capsys, monkeypatch):
    logger.warning("the page listens on 0.0.0.0")
    assert capsys.readouterr().err == "warning: the page listens on 0.0.0.0\n"
    monkeypatch.setenv("RANK", "1")  # another torchrun process: silent
    logger.warning("the page listens on 0.0.0.0")
    assert capsys.readouterr().err == ""


def test_only_the_known_harmless_notices_are_silenced(capsys):
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    handler = Keep()
    bnb.addHandler(handler)
    try:
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'")
        bnb.warning("something else went wrong")
    finally:
        bnb.removeHandler(handler)
    assert records == ["something else went wrong"]


def test_progress_bars_follow_the_terminal_or_the_setting(monkeypatch):
    monkeypatch.delenv("CODEUP_PROGRESS", raising=False)
    assert progress_bars_wanted() is False  # pytest captures stderr: not a terminal
    monkeypatch.setenv("CODEUP_PROGRESS", "1")
    assert progress_bars_wanted() is True
    monkeypatch.setenv("CODEUP_PROGRESS", "0")
    assert progress_bars_wanted() is False


def test_native_notices_are_dropped_line_by_line_and_nothing_else(capfd):
    with native_notices_dropped(TENSORFLOW_IMPORT_NOTICES):
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:1.2 10484 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b"E0000 00:00:1.3 10484 loader.cc:9] something real broke\n")
    assert capfd.readouterr().err == "E0000 00:00:1.3 10484 loader.cc:9] something real broke\n"


def test_an_error_in_the_block_still_shows_what_was_written(capfd):
    with pytest.raises(ImportError), native_notices_dropped(TENSORFLOW_IMPORT_NOTICES):
        os.write(2, b"libfoo.so: cannot open shared object file\n")
        raise ImportError("libfoo.so")
    assert capfd.readouterr().err == "libfoo.so: cannot open shared object file\n"


@pytest.mark.slow  # imports TensorFlow in a fresh process (about 15 s)
def test_loading_guesslang_prints_nothing():
    # Imported as data/preprocess.py imports it: data/ and the repository root on the path.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "data"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", "from language_detection import Guesslang; Guesslang()"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stderr == "", result.stderr[-3000:]
