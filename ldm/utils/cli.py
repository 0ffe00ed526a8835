"""How every command stops: one line on stderr naming the cause, a non-zero exit code, the traceback only on request.

    if __name__ == "__main__":
        sys.exit(run_command(main))        # `error: checkpoint x.ckpt is corrupt: ...`, exit 1

`HYDRA_FULL_ERROR=1` (Hydra's own switch) or `LDM_DEBUG=1` shows the full traceback instead. Where a run writes a
log file (Hydra's `train.log`), the stop goes there too, with its traceback; so do warnings (`warnings_to_log_files`):
skipped samples, converted images, FID evaluations put off; libraries' install-this notices are dropped
(`silence_notices`). Plain Python: every entry point imports this first.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable

from ldm.utils.rules import Float  # plain Python, like this module

log = logging.getLogger("ldm")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage mistake said in one line like every other error (exit code 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def existing_file(path: str) -> str:
    """argparse `type=`: a path that must be a file (`error: ... no such file: x.ckpt`)."""
    if not os.path.isfile(path):
        raise argparse.ArgumentTypeError(f"no such file: {path}")
    return path


def rule_type(rule) -> Callable[[str], object]:
    """argparse `type=` for a numeric option: its text read as a number and checked by ``rule`` (an
    `ldm.utils.rules` rule, usually the schema's rule of the config key the option stands for, so a command and its
    config allow the same values). A mistake is argparse's one line naming the option, before anything heavy:
    `error: python -m ldm.sample: argument --steps: -1: expected an integer in [1, 1000] (see --help)`."""

    def read(text: str):
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        else:
            value = text  # not a number: the rule says what it expected
        if not rule.ok(value):
            raise argparse.ArgumentTypeError(f"{text}: expected {rule.describe()}")
        return float(value) if isinstance(rule, Float) else value  # `--guidance-scale 5` is 5.0, as the config's

    read.__name__ = "number"
    return read


def check_interval(parser: argparse.ArgumentParser, interval: list[float] | None) -> None:
    """`--guidance-interval LOW HIGH`: argparse's one-line error unless LOW < HIGH."""
    if interval is not None and not interval[0] < interval[1]:
        parser.error(f"--guidance-interval {interval[0]:g} {interval[1]:g}: expected LOW < HIGH (noise levels sigma)")


class CarriedError(BaseException):
    """Carries an error through code that turns every Exception into a warning and goes on (Hydra calls its callbacks
    that way): `run_command` reports the ``error`` inside as if it had been raised itself."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def full_errors() -> bool:
    """Whether the user asked for tracebacks (HYDRA_FULL_ERROR=1 or LDM_DEBUG=1)."""
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes") for name in ("HYDRA_FULL_ERROR", "LDM_DEBUG"))


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../ldm
_OURS = (_PACKAGE + os.sep, os.path.join(os.path.dirname(_PACKAGE), "scripts") + os.sep)
_WORKER = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def one_line(error: BaseException) -> str:
    """The message of an error as one line. Errors of this project carry their cause in their message; a library's
    error gets its type name in front. An error re-raised from a dataloader worker is reported as the original."""
    text = str(error).strip()
    if _WORKER.match(text):  # torch re-raises a worker's error with the worker's traceback as its message
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = re.sub(r"^[\w.]+: ", "", last.strip())
    if isinstance(error, OSError) and error.filename and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = "; ".join(lines[:3]) if lines else ""
    if text and (_raised_by_us(error) or isinstance(error, OSError)):
        return text  # our messages name what is wrong; an OSError says its file
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _raised_by_us(error: BaseException) -> bool:
    """Whether this project raised the error (its class, or the frame that raised it, is ldm's or a script's)."""
    if type(error).__module__.split(".")[0] == "ldm":
        return True
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS)


def log_to_files(message: str, error: BaseException | None = None, level: int = logging.ERROR) -> None:
    """Write ``message`` (and the traceback of ``error``) to the run's log files only (stderr gets one line)."""
    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    if not files:
        return
    exc_info = (type(error), error, error.__traceback__) if error is not None else None
    record = log.makeRecord(log.name, level, "(stop)", 0, message, None, exc_info)
    for handler in files:
        handler.handle(record)


def run_command(main: Callable, *args, explain: Callable[[BaseException], str | None] = lambda e: None,
                full: bool | None = None) -> int:
    """Run a command's ``main(*args)``; its exit code. Any error is one line (``explain`` may word it better),
    written to stderr and to the run's log files; with ``full`` (default: `full_errors()`) it is raised as is."""
    full = full_errors() if full is None else full
    try:
        main(*args)
        return 0
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except (Exception, CarriedError) as caught:  # noqa: BLE001: every error ends the same way
        error = caught.error if isinstance(caught, CarriedError) else caught
        line = explain(error) or one_line(error)
        log_to_files(f"stopped: {line}", error)
        if full:
            raise error
        print(f"error: {line}", file=sys.stderr)
        return 1


# Notices libraries print on every run that ask the user to install something: (logger, start of the message).
NOTICES = (
    ("pytorch_lightning.utilities.rank_zero", "💡 Tip: For seamless cloud logging"),  # an ad for litlogger
    ("diffusers.models.modeling_utils", "Cannot initialize model with low cpu memory usage because `accelerate`"),
    ("diffusers.pipelines.pipeline_utils", "Cannot initialize model with low cpu memory usage because `accelerate`"),
)


class _DropNotice(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.start)


def silence_notices() -> None:
    """Drop `NOTICES` where they are logged (logger filters: they hold when logging is configured again)."""
    for name, start in NOTICES:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) and f.start == start for f in logger.filters):
            logger.addFilter(_DropNotice(start))


def warnings_to_log_files() -> None:
    """Also write every warning shown on stderr to the run's log files (forked dataloader workers inherit this)."""
    show = warnings.showwarning
    if getattr(show, "_ldm_logs", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        show(message, category, filename, lineno, file, line)
        log_to_files(f"{category.__name__}: {message}", level=logging.WARNING)

    showwarning._ldm_logs = True
    warnings.showwarning = showwarning
