"""bulkgen's driver side: job spec, dataset checks, planning, dispatch, commits, job record, CLI."""
