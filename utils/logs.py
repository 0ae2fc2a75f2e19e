"""The one notice channel of every stage: `logger.warning(...)` / `logger.info(...)` print
`warning: ...` / `...` on stderr, once: under torchrun only the process of rank 0 speaks.

    from utils.logs import logger
    logger.warning("the page listens on 0.0.0.0: other machines on your network can use it")
"""

import logging
import os
import sys


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
