"""The driver's log of one run, kept in the output at _logs/run-N.log.

Clusters come and go (a lost head takes its log files with it); the output
stays. So the driver copies its own log there: once as the run starts, every
few seconds while it runs (a driver killed with its cluster leaves what it
had logged up to then), and once more as the run ends, however it ends.
Object stores cannot append, so every copy rewrites the whole file; the log
keeps its first lines and its last ones, and says how many it dropped between.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from jobs.core.layout import OutputLayout
from jobs.core.storage import write_bytes
from jobs.redact import RedactSecrets

OURS = ("jobs", "workers", "bulkgen")  # loggers whose INFO lines belong in the run log
COPY_EVERY_S = 5.0
HEAD_LINES, TAIL_LINES = 2_000, 20_000  # about 4 MB at most


class RunLog(logging.Handler):
    """Collects the driver's log lines (ours from INFO, other libraries' from WARNING)
    and copies them to the output's `_logs/run-N.log`."""

    def __init__(self, output_uri: str, storage_options: dict, run: int):
        super().__init__(logging.INFO)
        self.url = OutputLayout(output_uri).url(OutputLayout.run_log(run))
        self.storage_options = storage_options
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.addFilter(RedactSecrets())  # the copy in the output outlives the run: never a credential in it
        self.head: list[str] = []
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.dropped = 0
        self._changed = False
        self._copied_at = 0.0
        self._copying = threading.Lock()
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name.split(".", 1)[0] in OURS
        if not ours and record.levelno < logging.WARNING:
            return
        line = self.format(record)
        if len(self.head) < HEAD_LINES:
            self.head.append(line)
        else:
            if len(self.tail) == self.tail.maxlen:
                self.dropped += 1
            self.tail.append(line)
        self._changed = True

    def text(self) -> str:
        with self.lock:  # emit() runs on other threads too
            middle = [f"[... {self.dropped} lines dropped ...]"] if self.dropped else []
            return "\n".join([*self.head, *middle, *self.tail]) + "\n"

    def copy(self, every: float = 0.0) -> None:
        """Write the log to the output if it changed (and `every` seconds passed).
        Never raises: a log that cannot be copied must not fail the job."""
        if not self._changed or time.monotonic() - self._copied_at < every:
            return
        if not self._copying.acquire(blocking=False):
            return
        try:
            self._changed = False
            self._copied_at = time.monotonic()
            write_bytes(self.url, self.text().encode(), self.storage_options)
        except Exception as e:  # storage trouble is the job's to report, not the log's
            self._changed = True
            logging.getLogger(__name__).warning("could not copy the run log to %s: %s", self.url, e)
        finally:
            self._copying.release()

    # -- attaching -----------------------------------------------------------------

    def __enter__(self) -> RunLog:
        """Start collecting: on the root logger, with our loggers lowered to INFO. The
        other handlers (the console's) are given a filter that drops what the levels
        before would have dropped, so they show what they showed."""
        root = logging.getLogger()
        shown_from = {name: logging.getLogger(name).getEffectiveLevel() for name in OURS}
        self._quiet = _ShownFrom(shown_from)
        self._handlers = [h for h in root.handlers if h is not self]
        for handler in self._handlers:
            handler.addFilter(self._quiet)
        for name in OURS:
            logger = logging.getLogger(name)
            self._levels[name] = logger.level
            if logger.getEffectiveLevel() > logging.INFO:
                logger.setLevel(logging.INFO)
        root.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        for handler in self._handlers:
            handler.removeFilter(self._quiet)
        self.copy()


class _ShownFrom(logging.Filter):
    """Drops our loggers' records below the level each logger had before the run."""

    def __init__(self, levels: dict[str, int]):
        super().__init__()
        self.levels = levels

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.levels.get(record.name.split(".", 1)[0], logging.NOTSET)


def print_run_log(output_uri: str, run: int | None = None, follow: bool = False, poll_s: float = 2.0,
                  storage_options: dict | None = None) -> None:
    """Print run `run`'s log (default: the latest run's) from the output; with `follow`,
    keep printing what the driver adds until the run ends."""
    from jobs.core.errors import OutputError
    from jobs.core.storage import read_bytes
    from jobs.output import read_record
    from jobs.record import driver_alive

    shown, ended = 0, False
    while True:
        record = read_record(output_uri, storage_options)
        runs = len(record.runs)
        number = run or runs
        if not 1 <= number <= runs:
            raise OutputError(f"{output_uri} has {runs} run(s); there is no run {number}")
        url = OutputLayout(output_uri).url(OutputLayout.run_log(number))
        try:
            text = read_bytes(url, storage_options or {}).decode(errors="replace")
        except FileNotFoundError:
            text = ""
        print(text[shown:], end="", flush=True)
        shown = len(text)
        if not follow or ended:
            return
        # The driver copies its log once more after the record says the run ended.
        ended = number < runs or record.state.final or not driver_alive(record.to_json())
        time.sleep(poll_s)
