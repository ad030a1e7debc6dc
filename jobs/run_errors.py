"""How a run ends other than in success: what run_job raises once the job has started.

Bad input and an unusable output are refused before that, as BadInput (jobs/core/errors.py).
"""


class JobError(RuntimeError):
    """The job ran and failed; committed shards are kept and the job can be resumed."""


class JobCancelled(RuntimeError):
    """The job was cancelled; committed shards are kept and the job can be resumed."""
