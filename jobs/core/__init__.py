"""The contracts both sides of a job share, and nothing else.

    spec          the job spec, validated once when loaded
    plan          shards from Parquet footer facts (pure)
    protocol      the shard task the driver sends and the result a replica returns
    layout        every path of a job's output
    rows          row identity and the columns of every file a job writes
    errors        bad input: the errors reported as exit 2
    storage       storage I/O: retries, whole-file writes, Parquet
    times         the one timestamp type
    prompts       a row of prompt columns to prompt text and token ids, or a row error
    openai_batch  the OpenAI batch format: request lines in, response lines out
    row_prompt    a row's prompt, whichever the input format
    model         what both sides read of a model before its weights: tokenizer, config
    vllm_support  whether the vLLM engine can run a spec
    adapters      LoRA adapters: names, files' hash, what their config and weights' header say
    cache         the row cache's keys, layout and entry
    structured    what a sequence's text must satisfy (a schema, a regex, choices)
    dedupe        a sequence's fingerprint and the name of the job's duplicate index
    reasoning     a thinking model's tags, and its completion split into reasoning and answer
    metrics       the Prometheus series, defined once for the driver, replicas and dashboard
    faults        the named fault-injection points tests trip
    prefix        shared prompt prefixes: stable keys and lengths

Imports neither the driver (the rest of `jobs`) nor the replica side
(`workers`), nor Ray nor torch; tests/test_imports.py keeps it so.
"""
