"""bulkgen's replica side: what runs in a replica actor.

    replica              the Ray actor: loads its engine once, turns shard tasks into staged files
    stages/              a shard attempt's work, stage by stage (stages/__init__.py lists them)
    shard_io             a shard's output rows gathered, then staged as files
    quality              evaluation against references and quality filters
    row_cache            the replica's side of the row cache: look up, publish once committed
    row_cache_store      the row cache's store: batched reads, whole-object writes
    engine_loop          runs the engine in one thread, fed by every shard in flight
    engine               the engine interface: requests in, completions out
    engine_factory       chooses and loads the engine (model.engine)
    transformers_engine  continuous batching with a KV cache on any HF causal LM
    admission            the transformers engine's waiting requests: one order across shards, aging
    attention            the transformers engine's grouped-query attention on CPU, without a KV copy
    kv_batch             the transformers engine's running batch and its cache surgery
    sampling             the transformers engine's next-token choice
    grammar              structured output's grammars: llguidance matchers, the transformers engine's masks
    vllm_engine          vLLM behind the engine interface
"""
