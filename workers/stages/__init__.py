"""A replica's work on a shard attempt, as a list of stages chosen once from the spec.

    read              the task's rows: a Parquet row range (read.py), an OpenAI batch
                      file's lines (batch.py), or retry-failed's dead letters (read.py)
    render            prompts, token ids and one request per sample (render.py; batch.py)
    adapter           model.adapter(s): each row's LoRA adapter, on its requests (adapter.py)
    ask_structured    structured output: each request's constraint, the row's or the job's (structured.py)
    ask_logprobs      generation.logprobs: every request asks for its tokens' logprobs (logprobs.py)
    cache_lookup      cache.uri: sequences the row cache already has (cache.py)
    generate          the rest, on the engine (generate.py)
    reasoning         generation.reasoning: the thinking apart from the answer (reasoning.py)
    check_structured  structured output: a sequence that misses its constraint is a dead letter (structured.py)
    logprobs          generation.logprobs: the token_ids, token_logprobs, ... columns (logprobs.py)
    filter            filters: drop sequences to filtered/ (filter.py)
    evaluate          evaluation: scores against the row's reference (evaluate.py)
    write             assemble the rows and stage the attempt's files (write.py)
    cache_keep        cache.uri: hold the generated sequences until the commit (cache.py)

build_stages is the one place they are chosen: a feature that is off is absent
from the list, not a branch inside a stage. What flows between them is one
ShardWork per attempt (work.py); each stage declares the output columns it adds
and the Tally counters it adds to (stage.py). A new feature is one new module
and one line here.
"""

from __future__ import annotations

from dataclasses import dataclass

from jobs.core.protocol import TaskKind
from jobs.core.rows import is_batch, logprobs_possible, structured_possible
from jobs.core.spec import JobSpec
from workers.engine_loop import EngineLoop
from workers.row_cache import ReplicaCache
from workers.stages.adapter import ChooseAdapter
from workers.stages.batch import BatchReader, RenderBatch
from workers.stages.cache import CacheKeep, CacheLookup
from workers.stages.evaluate import Evaluate
from workers.stages.filter import Filter
from workers.stages.generate import Generate
from workers.stages.logprobs import AskLogprobs, LogprobColumns
from workers.stages.read import DeadLetterReader, ParquetReader
from workers.stages.reasoning import SplitReasoning
from workers.stages.render import Render
from workers.stages.stage import Stage
from workers.stages.structured import AskStructured, CheckStructured
from workers.stages.write import Write, file_metadata


@dataclass(frozen=True)
class Stages:
    readers: dict[TaskKind, Stage]  # the first stage, by the kind of task
    steps: tuple[Stage, ...]  # the stages after the read, the same for every task

    def for_task(self, kind: TaskKind) -> list[Stage]:
        return [self.readers[kind], *self.steps]

    def stats(self) -> dict:
        """The stages' counters over the replica's life (the engine's among them)."""
        return {k: v for stage in self.steps for k, v in stage.stats().items()}

    def publish(self, attempt: str) -> int:
        """The driver committed `attempt`: what the stages kept of it is published (the row cache's entries)."""
        return sum(stage.publish(attempt) for stage in self.steps)


def needs(stages: list[Stage]) -> frozenset[str]:
    """What the stages read of a sequence besides its text."""
    return frozenset().union(*(stage.needs for stage in stages))


def build_stages(spec: JobSpec, loop: EngineLoop, job_facts: dict, engine: dict) -> Stages:
    """A replica's stages for `spec`, running on `loop`'s engine (`engine`: its describe());
    `job_facts`: what the driver says of the job, for every file's metadata and the cache key."""
    batch = is_batch(spec.input)
    tokenizer, context = loop.engine.tokenizer, loop.engine.context_length
    cache = ReplicaCache(spec, job_facts.get("model", {}), engine) if spec.cache is not None else None
    g, structured, logprobs = spec.generation, structured_possible(spec), logprobs_possible(spec)
    # The stages that read what was generated: a row-cache entry must hold what they need.
    parse = [
        *([SplitReasoning(spec, tokenizer)] if g.reasoning != "off" else []),
        *([CheckStructured(spec, tokenizer)] if structured else []),
        *([LogprobColumns(spec)] if logprobs else []),
    ]
    steps = [
        (RenderBatch if batch else Render)(spec, tokenizer, context),
        *([ChooseAdapter(spec)] if spec.model.adapter_set() else []),
        *([AskStructured(spec)] if structured else []),
        *([AskLogprobs(spec)] if logprobs else []),
        *([CacheLookup(cache, needs(parse))] if cache is not None else []),
        Generate(loop),
        *parse,
        *([Filter(spec)] if spec.filters is not None else []),
        *([Evaluate(spec)] if spec.evaluation is not None else []),
        Write(spec, file_metadata(job_facts, engine)),
        *([CacheKeep(cache)] if cache is not None else []),
    ]
    readers = {
        TaskKind.PROCESS: BatchReader(spec) if batch else ParquetReader(spec),
        TaskKind.RETRY_FAILED: DeadLetterReader(spec),
    }
    return Stages(readers, tuple(steps))
