"""What each preset runs: model, workload sizes, batch sizes, bulkgen resources.

Sizes are set by the slowest system, the one-prompt-at-a-time loop: on the
2-core CPU preset the whole benchmark must finish in under 25 minutes
(issue 20 added augment and the small job; the scale row runs only when asked for).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bench.model import CPU_SHAPE, GPU_SHAPE, ModelShape


@dataclass(frozen=True)
class Preset:
    name: str
    device: str
    dtype: str
    shape: ModelShape
    uniform: tuple[int, int, int]  # rows, prompt tokens, new tokens
    long_tail_rows: int  # prompts 8-512 tokens (log-uniform), limits 1-256 (uniform)
    sampling: tuple[int, int, int, int]  # rows, prompt tokens, new tokens, num_return_sequences
    # rows, templates (system prompts), tokens per template, new tokens; each row adds 16-64 tokens
    augment: tuple[int, int, int, int]
    augment_transformers_rows: int  # bulkgen[transformers] runs augment's first rows only (it prefills every prefix)
    small: tuple[int, int]  # the small job, end to end: rows (prompts 8-200 tokens), new tokens
    static_batch_sizes: tuple[int, ...]  # sequences per batch, tried on every workload
    cb_max_requests: int  # transformers continuous batching: requests per batch (sizes its cache)
    cb_batch_tokens: int  # transformers continuous batching: most tokens per forward (at least the longest sequence)
    bulkgen_layouts: tuple[tuple[int, int], ...]  # (replicas, torch threads) tried on long-tail
    bulkgen_sequences: int  # sequences one replica generates together (engine batch_size)
    # vLLM's EngineArgs beyond what the batch sizes set, for vLLM offline and bulkgen's
    # vLLM engine alike (bulkgen: model.engine_options).
    vllm_options: dict = field(default_factory=dict)
    naive_every: int = 1  # the naive loop runs every k-th prompt (1: all of them)
    # A larger long-tail that only vLLM offline and bulkgen[vllm] run (after long-tail has
    # picked their layouts): on 64 rows the last few long rows dominate either's time.
    engine_long_tail_rows: int | None = None
    peak_matmul: int = 2048  # n of the (n x n) @ (n x n) matmul that measures peak FLOP/s


CPU = Preset(
    name="cpu",
    device="cpu",
    dtype="float32",
    shape=CPU_SHAPE,
    uniform=(64, 64, 48),
    long_tail_rows=64,
    engine_long_tail_rows=512,
    sampling=(16, 64, 64, 4),
    # 2,048 rows (the plan's first size) ran about 100 s per vLLM system on one thread: halved.
    augment=(1024, 4, 384, 48),
    augment_transformers_rows=256,
    small=(768, 48),
    static_batch_sizes=(8, 16, 32),
    cb_max_requests=32,
    cb_batch_tokens=512,
    # The question the benchmark answers on 2 cores: one replica with 2 threads,
    # or 2 replicas with 1 thread each. The faster one runs the other workloads.
    bulkgen_layouts=((1, 2), (2, 1)),
    bulkgen_sequences=32,
    # Eager: start-up in seconds; compiling the model took longer than the workloads run.
    vllm_options={"enforce_eager": True},
)

GPU = Preset(
    name="gpu",
    device="cuda",
    dtype="bfloat16",
    shape=GPU_SHAPE,
    uniform=(256, 128, 128),
    long_tail_rows=512,
    sampling=(64, 128, 128, 4),
    augment=(16384, 8, 512, 48),
    augment_transformers_rows=2048,
    small=(768, 48),
    static_batch_sizes=(64, 128, 256),
    cb_max_requests=256,
    cb_batch_tokens=8192,
    bulkgen_layouts=((1, 1),),  # one GPU, one replica
    bulkgen_sequences=256,
    # One prompt at a time runs at tens of tokens/s whatever the GPU (kernel
    # launches); 1 prompt in 16 keeps it to a few minutes, with the same length mix.
    naive_every=16,
    peak_matmul=8192,
    # vLLM's default (0.92 of the GPU) does not fit beside the baselines' model, which
    # the benchmark process keeps on the same GPU.
    vllm_options={"gpu_memory_utilization": 0.8},
)

# A few seconds end to end: checks the code paths, measures nothing. Head size 32:
# vLLM's CPU attention takes 32, 64, 80, 96, 112, 128, ... only.
SMOKE_SHAPE = ModelShape(vocab=512, hidden=128, layers=2, heads=4, kv_heads=2, intermediate=256, max_positions=1024)


def smoke(preset: Preset) -> Preset:
    return Preset(
        name=f"{preset.name}-smoke",
        device=preset.device,
        dtype=preset.dtype,
        shape=SMOKE_SHAPE,
        uniform=(6, 16, 8),
        long_tail_rows=8,
        engine_long_tail_rows=16,
        sampling=(3, 16, 8, 2),
        augment=(32, 2, 200, 8),  # two 128-token blocks of vLLM's CPU cache: hits show
        augment_transformers_rows=16,
        small=(24, 8),
        static_batch_sizes=(2, 4),
        cb_max_requests=4,
        cb_batch_tokens=preset.cb_batch_tokens,
        bulkgen_layouts=preset.bulkgen_layouts,
        bulkgen_sequences=4,
        naive_every=2,
        peak_matmul=256,
        vllm_options=preset.vllm_options,
    )


PRESETS = {"cpu": CPU, "gpu": GPU}
