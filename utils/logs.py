"""The one notice channel of every stage: `logger.warning(...)` / `logger.info(...)` print
`warning: ...` / `...` on stderr, once: under torchrun only the process of rank 0 speaks.

    from utils.logs import logger
    logger.warning("the page listens on 0.0.0.0: other machines on your network can use it")
"""

import contextlib
import logging
import os
import sys
import tempfile
import warnings


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno == logging.INFO else f"{record.levelname.lower()}: {message}"


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", 0)) == 0


def _build_logger() -> logging.Logger:
    built = logging.getLogger("codeup")
    if not built.handlers:
        # The handler looks up sys.stderr at each message, so tests that capture stderr see it.
        handler = _StderrHandler()
        handler.setFormatter(_Format("%(message)s"))
        handler.addFilter(_RankZero())
        built.addHandler(handler)
        built.setLevel(logging.INFO)
        built.propagate = False
    return built


class _StderrHandler(logging.StreamHandler):
    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


logger = _build_logger()


# Notices from libraries that a user cannot act on, silenced at their source (only these: every
# other warning still shows). Import this module before torch/transformers/peft for the first one,
# which bitsandbytes logs while it is imported.
class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def silence_notice(logger_name: str, text: str) -> None:
    """Drop the records of one library logger whose message contains `text` (only those)."""
    target = logging.getLogger(logger_name)
    if not any(isinstance(f, _DropMessage) and f.text == text for f in target.filters):
        target.addFilter(_DropMessage(text))


# An optional faster 4-bit CPU kernel (the `kernels` package) is missing: nothing is wrong.
silence_notice("bitsandbytes.backends.cpu.ops", "from kernels-community")
# transformers 5 deprecates a name that PEFT and the Trainer themselves still call.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)


# TensorFlow (under Guesslang's model) writes these from C++ while it is imported, twice, straight to
# file descriptor 2: since TensorFlow 2.19 TF_CPP_MIN_LOG_LEVEL no longer reaches them
# (tensorflow/tensorflow#100442), and the data stage runs on the CPU by design.
TENSORFLOW_IMPORT_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "Could not find cuda drivers on your machine, GPU will not be used",
)


@contextlib.contextmanager
def native_notices_dropped(notices: tuple[str, ...]):
    """While the block runs, hold back what native code writes to file descriptor 2 (where Python's
    logging and warnings filters cannot reach), then pass every line on except those that contain
    one of `notices`. Output order is kept; an exception in the block still shows everything."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            for line in held.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in notices):
                    sys.stderr.write(line)
            sys.stderr.flush()


def progress_bars_wanted() -> bool:
    """Progress bars redraw themselves with carriage returns and cursor moves: on a terminal that is
    what you want, in a log file it leaves fragments (`\r`, `[A`). CODEUP_PROGRESS=1/0 decides."""
    setting = os.environ.get("CODEUP_PROGRESS", "")
    return setting != "0" if setting else sys.stderr.isatty()


if not progress_bars_wanted():  # every library's bars, before they are made
    for variable in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(variable, "1")
