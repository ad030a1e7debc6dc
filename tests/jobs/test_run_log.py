"""The driver's run log (jobs/run_log.py): what it keeps, where it copies it, and
that a log it cannot copy never fails the job."""

from __future__ import annotations

import logging

from jobs import run_log
from jobs.run_log import RunLog


def test_collects_our_info_and_others_warnings_and_copies_them(tmp_path):
    out = tmp_path / "out"
    with RunLog(str(out), {}, run=3) as log:
        logging.getLogger("jobs.driver").info("committed part-00000")
        logging.getLogger("workers.replica").debug("too fine to keep")
        logging.getLogger("urllib3").info("another library's chatter")
        logging.getLogger("urllib3").warning("another library's warning")
    text = (out / "_logs" / "run-3.log").read_text()  # copied as the run ends
    assert "committed part-00000" in text and "another library's warning" in text
    assert "too fine" not in text and "chatter" not in text
    assert log not in logging.getLogger().handlers
    assert logging.getLogger("jobs").level == logging.NOTSET  # the level it had before


def test_a_long_log_keeps_its_head_and_tail(monkeypatch, tmp_path):
    monkeypatch.setattr(run_log, "HEAD_LINES", 3)
    monkeypatch.setattr(run_log, "TAIL_LINES", 4)
    with RunLog(str(tmp_path), {}, run=1):
        for i in range(20):
            logging.getLogger("jobs.x").info("line %d", i)
    lines = (tmp_path / "_logs" / "run-1.log").read_text().splitlines()
    assert [line.rsplit(" ", 1)[1] for line in lines[:3]] == ["0", "1", "2"]
    assert lines[3] == "[... 13 lines dropped ...]"
    assert [line.rsplit(" ", 1)[1] for line in lines[4:]] == ["16", "17", "18", "19"]


def test_copies_at_most_every_few_seconds_and_only_when_changed(tmp_path):
    log = RunLog(str(tmp_path), {}, run=1)
    target = tmp_path / "_logs" / "run-1.log"
    log.copy()
    assert not target.exists()  # nothing logged yet
    log.handle(logging.LogRecord("jobs.x", logging.INFO, __file__, 1, "first", None, None))
    log.copy(every=60)  # never copied before: now
    assert "first" in target.read_text()
    log.handle(logging.LogRecord("jobs.x", logging.INFO, __file__, 1, "second", None, None))
    log.copy(every=60)
    assert "second" not in target.read_text()  # within the minute
    log.copy()
    assert "second" in target.read_text()


def test_a_log_that_cannot_be_copied_does_not_fail_the_run(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    log = RunLog(str(blocker), {}, run=1)  # _logs/ would go under a file
    log.handle(logging.LogRecord("jobs.x", logging.INFO, __file__, 1, "hello", None, None))
    log.copy()  # no exception
    assert "could not copy the run log" in caplog.text


def test_the_console_shows_what_it_showed_before(tmp_path):
    import io

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        assert logging.getLogger("jobs").getEffectiveLevel() == logging.WARNING  # the default
        with RunLog(str(tmp_path), {}, run=1):
            logging.getLogger("jobs.driver").info("for the run log only")
            logging.getLogger("jobs.driver").warning("for both")
    finally:
        root.removeHandler(handler)
    assert console.getvalue().splitlines() == ["for both"]
    assert handler.filters == []
    text = (tmp_path / "_logs" / "run-1.log").read_text()
    assert "for the run log only" in text and "for both" in text
