"""bulkgen's driver side, and below it the contracts both sides share (jobs.core).

    cli             the `bulkgen` command line; each command calls one module below
    validate        everything checked before a shard runs (`bulkgen validate`); what before a replica loads
    dataset         the input as the driver sees it: files, footers, schema checks
    preflight       checks that need the model's files
    weights_cache   a checkpoint's weights sha256, kept between runs by file version
    snapshot        the input a job was planned on, pinned, which the plan is rebuilt from
    replica_plan    how many replicas a run starts on its cluster, and whether one fits at all
    scheduler       which shard runs next and what a failure costs (policy, no Ray)
    replica_pool    the replica actors: launched early, configured, watched while they load, replaced
    dispatch        the Ray plumbing of a run: shards sent, outcomes back
    driver          one run of a job, its steps in order (it only sequences them)
    commit_listener what a done shard sets off: commit, counts, record, metrics, progress; cancel polls
    finalize        the end of a run: batch files, error budget, manifest, _SUCCESS
    run_errors      how a started run ends other than in success (JobError, JobCancelled)
    ray_connection  joining a Ray cluster, or starting a local one
    claim           one driver per output: the atomic claim of each run
    output          the output directory and its commit protocol
    record          the job record (_job.json) and its typed states
    record_file     reading _job.json for the operators' commands
    run_log         the driver's log of a run, kept at _logs/
    driver_metrics  the Prometheus series the driver records
    dedupe_index    the Ray actor holding the job's kept sequences (filters.deduplicate)
    batch_output    output.jsonl and errors.jsonl of an openai-batch output
    cancel          the _CANCEL request `bulkgen cancel` writes and the driver polls
    submit          `bulkgen submit`: the driver as a Ray Job
    k8s             `bulkgen k8s`: the KubeRay manifests that run a job
    storage_options `--storage-option KEY=VALUE` on the command line
    redact          keeps credentials out of every log
    report/         a job's report: _report/index.html, report.md, figures
    core/           the contracts both sides share (jobs/core/__init__.py lists them)
"""
