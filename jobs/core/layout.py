"""Every path of a job's output, spelled once.

    _job.json                  the job record (jobs/record.py)
    data/part-NNNNN.parquet    generated rows of shard NNNNN
    errors/part-NNNNN.parquet  its dead letters, when it has any
    filtered/part-NNNNN.parquet  rows a quality filter dropped
    _commits/part-NNNNN.json   the shard's commit record, written last
    _manifest.json             all commit records, written at the end
    _staging/part-NNNNN/ATTEMPT/{data,errors,filtered}.parquet  an attempt's files before commit
    _logs/run-N.log            the driver's log of run N
    _report/index.html         the job's report, one self-contained page (jobs/report/)
    _report/report.md          the same content as Markdown, beside its figures
    _report/figures/NAME.png   the report's figures
    _CANCEL                    a cancel request, polled by the driver
    _claims/run-NNNNN.json     run NNNNN's claim on the output: one driver at a time (jobs/claim.py)
    output.jsonl, errors.jsonl with output.format openai-batch: one line per request, as the
                               providers' batch output and error files (jobs/batch_output.py)
    _SUCCESS                   written last, only when the job succeeded

Names starting with `_` or `.` are not data (the convention of Spark and
pyarrow.dataset), so a reader of data/ never sees bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.core.plan import shard_name

RECORD = "_job.json"
MANIFEST = "_manifest.json"
SUCCESS = "_SUCCESS"
CANCEL = "_CANCEL"
COMMITS = "_commits"
STAGING = "_staging"
LOGS = "_logs"
CLAIMS = "_claims"
REPORT = "_report"
REPORT_HTML, REPORT_MARKDOWN, REPORT_FIGURES = "index.html", "report.md", "figures"
DATA, ERRORS, FILTERED = "data", "errors", "filtered"
# The kinds of a shard's files, in the order a commit publishes them: data last (jobs/output.py).
SHARD_FILES = (ERRORS, FILTERED, DATA)
BATCH_OUTPUT, BATCH_ERRORS = "output.jsonl", "errors.jsonl"

# What `--overwrite` deletes: everything a job writes, and nothing else. The claims stay:
# they are the output's, not a job's, and the driver deleting the rest holds the latest.
JOB_ENTRIES = (
    SUCCESS, MANIFEST, BATCH_OUTPUT, BATCH_ERRORS, COMMITS, DATA, ERRORS, FILTERED, STAGING, REPORT, LOGS, CANCEL, RECORD
)
BULKGEN_ENTRIES = (*JOB_ENTRIES, CLAIMS)  # everything bulkgen may have made in an output


@dataclass(frozen=True)
class OutputLayout:
    """The output's root URL and every relative path under it."""

    uri: str

    def __post_init__(self):
        object.__setattr__(self, "uri", self.uri.rstrip("/"))

    def url(self, relpath: str) -> str:
        return f"{self.uri}/{relpath}"

    @staticmethod
    def shard_file(kind: str, shard: int) -> str:
        """A shard's committed file of one of the SHARD_FILES kinds."""
        return f"{kind}/{shard_name(shard)}.parquet"

    @staticmethod
    def data(shard: int) -> str:
        return OutputLayout.shard_file(DATA, shard)

    @staticmethod
    def errors(shard: int) -> str:
        return OutputLayout.shard_file(ERRORS, shard)

    @staticmethod
    def filtered(shard: int) -> str:
        return OutputLayout.shard_file(FILTERED, shard)

    @staticmethod
    def commit(shard: int) -> str:
        return f"{COMMITS}/{shard_name(shard)}.json"

    @staticmethod
    def staging(shard: int, attempt: str | None = None) -> str:
        """A shard's staging directory, or one attempt's inside it."""
        where = f"{STAGING}/{shard_name(shard)}"
        return f"{where}/{attempt}" if attempt else where

    @staticmethod
    def staged_file(kind: str, shard: int, attempt: str) -> str:
        """An attempt's file of one of the SHARD_FILES kinds, before its commit."""
        return f"{OutputLayout.staging(shard, attempt)}/{kind}.parquet"

    @staticmethod
    def claim(run: int) -> str:
        return f"{CLAIMS}/run-{run:05d}.json"

    @staticmethod
    def run_log(run: int) -> str:
        return f"{LOGS}/run-{run}.log"

    @staticmethod
    def report_html() -> str:
        return f"{REPORT}/{REPORT_HTML}"

    @staticmethod
    def report_markdown() -> str:
        return f"{REPORT}/{REPORT_MARKDOWN}"

    @staticmethod
    def report_figures() -> str:
        return f"{REPORT}/{REPORT_FIGURES}"

    @staticmethod
    def report_figure(name: str) -> str:
        return f"{OutputLayout.report_figures()}/{name}.png"
