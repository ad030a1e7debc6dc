"""Build a job's report and write it under OUTPUT_URI/_report/.

Works on any output with a job record, whatever its state: a running job's
report covers the shards committed so far, a failed job's says it failed and
why. The figures go first and index.html last, so a reader who finds
index.html finds the figures report.md links.
"""

from __future__ import annotations

import logging
import posixpath
from dataclasses import dataclass

from jobs.core.layout import REPORT, OutputLayout
from jobs.core.storage import write_bytes
from jobs.output import OutputDir
from jobs.report import content, render
from jobs.report.data import SAMPLE_ROWS, read_output

log = logging.getLogger(__name__)


@dataclass
class Written:
    html: str  # the URL of index.html
    markdown: str
    state: str  # the job's state when the report was built
    notice: str | None  # what the report says first: running, failed, cancelled


def write_report(uri: str, storage_options: dict, sample_rows: int = SAMPLE_ROWS) -> Written:
    """Read the output, build the report, write index.html, report.md and figures/."""
    data = read_output(uri, storage_options, sample_rows)
    report = content.build(data)
    out = OutputDir(uri, storage_options)
    out.remove(OutputLayout.report_figures())  # a figure the last report drew may have nothing to show now
    for figure in report.figures:
        write_bytes(out.url(OutputLayout.report_figure(figure.name)), figure.png, storage_options)
    # report.md links its figures relative to itself.
    relative = lambda name: posixpath.relpath(OutputLayout.report_figure(name), REPORT)  # noqa: E731
    markdown = render.markdown(report, relative)
    html_url, markdown_url = out.url(OutputLayout.report_html()), out.url(OutputLayout.report_markdown())
    write_bytes(markdown_url, markdown.encode(), storage_options)
    write_bytes(html_url, render.page(report, data.state.value).encode(), storage_options)
    log.info("report of %s (%s) written to %s", uri, data.state.value, html_url)
    return Written(html_url, markdown_url, data.state.value, report.notice)
