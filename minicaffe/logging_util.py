"""Caffe-style (glog) log lines, so tools that parse Caffe logs read minicaffe's too.

    I0513 12:34:56.789012 4242 base.py:310] Iteration 100, lr = 0.00992565

minicaffe's modules log to the "minicaffe" logger and, as a library, print
nothing until told to: `minicaffe.init_log()` (pycaffe's name) sends INFO lines
to stderr, optionally also to a file. The CLI calls it for every command.
Lines go through tqdm.write so they do not tear a progress bar.
"""
import contextlib
import datetime
import logging
import sys
import time

from .proto_io import ProtoFileError, check_output_folder

__all__ = ["GlogFormatter", "init_log", "close_log", "logging_to", "log", "Timer"]

LOGGER_NAME = "minicaffe"
_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}


class GlogFormatter(logging.Formatter):
    """`<severity letter>MMDD hh:mm:ss.uuuuuu <pid> <file>:<line>] <message>`."""

    def format(self, record):
        level = record.levelno
        letter = "F" if level >= 50 else "E" if level >= 40 else "W" if level >= 30 else "I"
        t = datetime.datetime.fromtimestamp(record.created)
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return (f"{letter}{t:%m%d %H:%M:%S}.{t.microsecond:06d} {record.process} "
                f"{record.filename}:{record.lineno}] {text}")


class _StderrHandler(logging.Handler):
    """Writes to `stream` (the current sys.stderr when None), politely around tqdm bars."""

    def __init__(self, stream=None):
        super().__init__()
        self.stream = stream

    def emit(self, record):
        try:
            message = self.format(record)
            stream = self.stream if self.stream is not None else sys.stderr
            try:
                from tqdm import tqdm
                tqdm.write(message, file=stream)
            except ImportError:
                stream.write(message + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


def _level(level):
    if isinstance(level, str):
        return logging.getLevelName(level.upper())
    return _GLOG_LEVELS.get(level, level) if level < 10 else level


def init_log(level=logging.INFO, log_file=None, stream=None):
    """Log minicaffe's messages (Caffe-style) to stderr and, if given, to `log_file` too.

    `level` is a logging level, its name, or a glog severity 0-3 (pycaffe's init_log).
    Calling it again replaces the handlers it installed before.
    """
    logger = logging.getLogger(LOGGER_NAME)
    close_log()
    formatter = GlogFormatter()
    handlers = [_StderrHandler(stream)]
    if log_file:
        check_output_folder(log_file, "log file")
        try:
            handlers.append(logging.FileHandler(log_file, mode="w", encoding="utf-8"))
        except OSError as exc:
            raise ProtoFileError(f"{log_file}: cannot write the log file: "
                                 f"{exc.strerror or exc}") from None
    for h in handlers:
        h.setFormatter(formatter)
        h._minicaffe_handler = True
        logger.addHandler(h)
    logger.setLevel(_level(level))
    return logger


def close_log():
    """Remove (and close) the handlers init_log installed."""
    logger = logging.getLogger(LOGGER_NAME)
    for h in list(logger.handlers):
        if getattr(h, "_minicaffe_handler", False):
            logger.removeHandler(h)
            h.close()


@contextlib.contextmanager
def logging_to(log_file=None, level=logging.INFO):
    """init_log for the duration of a `with` block (a CLI command), then close the file."""
    init_log(level, log_file)
    try:
        yield logging.getLogger(LOGGER_NAME)
    finally:
        close_log()


def log(message):
    """pycaffe's caffe.log: one INFO line (Caffe's LOG(INFO))."""
    logging.getLogger(LOGGER_NAME).info("%s", message)


class Timer:
    """pycaffe's caffe.Timer: start(), stop(), and `ms`, the milliseconds between them
    (or since start() while it runs), as Caffe's CPU Timer."""

    def __init__(self):
        self._start = self._stop = None

    def start(self):
        self._start, self._stop = time.perf_counter(), None

    def stop(self):
        if self._start is not None and self._stop is None:
            self._stop = time.perf_counter()

    @property
    def ms(self):
        if self._start is None:
            return 0.0
        end = self._stop if self._stop is not None else time.perf_counter()
        return (end - self._start) * 1000.0
