"""One notice channel: `warning: ...` on stderr from rank 0 only; known-harmless library notices
silenced at their source, nothing else; progress bars only where they can redraw."""

import logging

from utils.logs import logger, progress_bars_wanted


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
