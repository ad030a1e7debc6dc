"""The transformers engine: continuous batching with a KV cache on any HF causal LM.

Why our own decode loop instead of `model.generate`:
- a finished sequence leaves the running batch at once, and waiting ones are
  prefilled and spliced in, so long-tail answers never idle the rest;
- the batch is bounded by tokens (what the KV cache holds), not rows;
- every sequence samples from its own seeded generator, so its text depends
  on (job seed, row id, sample_index) only, not on its neighbours;
- stop strings, token counts and finish reasons are decided per sequence.

The cache surgery lives in workers/kv_batch.py, the waiting order in
workers/admission.py, the CPU attention in workers/attention.py and the
choice of the next token in workers/sampling.py; a test checks greedy
output against `model.generate` token for token. (Over 300 lines: admission, decoding and
failure isolation all act on the one running batch; split apart, they would
hand its state back and forth.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import torch

from jobs.core import faults, structured
from jobs.core.adapters import BASE
from jobs.core.errors import ModelError
from jobs.core.model import context_length, load_tokenizer, missing_weights
from jobs.core.prefix import shared_prefix_len
from jobs.core.rows import structured_possible
from workers import sampling
from workers.admission import WaitingQueue
from workers.attention import use_grouped_attention
from workers.engine import Completion, FatalDeviceError, Request, SamplingParams, TopLogprobs, completion_text
from workers.grammar import Grammars
from workers.kv_batch import Batch, Row, merge, slab_cache, spliceable

log = logging.getLogger(__name__)

# Most of a prefill's token positions that may be padding. Measured on the
# long-tail benchmark (bench/): unbounded, over half of all positions the engine
# computed were prefill padding; at 0.25 it was 10% and throughput rose 1.2x.
PREFILL_PAD_LIMIT = 0.25
# Prefill a prefix that every row of a chunk shares once, not once per row (_shared_prefix).
PREFIX_SHARE = True


class TransformersEngine:
    """Generates completions on one model replica (implements workers.engine.Engine).

    `submit` queues requests; each `step` admits waiting requests while the
    budgets allow and decodes one token for every running sequence; finished
    sequences come back from `step`."""

    name = "transformers"

    def __init__(
        self,
        model,
        tokenizer,
        params: SamplingParams,
        batch_size: int,
        max_batch_tokens: int,
        adapters=frozenset(),
        grammars: Grammars | None = None,
    ):
        """`adapters`: the names of the LoRA adapters `model` (then a PeftModel) holds; `grammars`:
        for a job whose requests may carry a constraint (structured output)."""
        self.model = model
        self.adapters = frozenset(adapters)
        self.tokenizer = tokenizer
        self.params = params
        self.batch_size = batch_size  # current limit; lowered after running out of memory
        self.max_batch_tokens = max_batch_tokens
        self.device = model.device
        self.pad_id = _pad_id(model, tokenizer)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.stop_window = _stop_window(params.stop)
        self.grammars = grammars
        self.context_length = context_length(model.config)
        self.waiting = WaitingQueue()
        self.running: Batch | None = None
        self.splice = True  # refill a running batch; off for caches we cannot splice
        self.prefill_pad_limit = PREFILL_PAD_LIMIT
        self.prefix_share = PREFIX_SHARE
        self._healthy_batch_size = batch_size  # restored once a failing sequence is isolated
        # Token positions pushed through the model: real ones, and with padding.
        # generated_tokens: of finished sequences, as vLLM's engine counts them (the row cache's test reads it).
        # prefix_shared_tokens: prompt positions not computed because a chunk's rows shared a prefix.
        self.counters = {"forward_tokens": 0, "padded_tokens": 0, "prefill_positions": 0, "steps": 0,
                         "generated_tokens": 0, "prefix_shared_tokens": 0}  # fmt: skip

    @classmethod
    def from_spec(cls, spec) -> TransformersEngine:
        """Load the model the way a real checkpoint is loaded; the only place torch is set up."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        m, res = spec.model, spec.resources
        threads = res.torch_threads or max(1, int(res.num_cpus))
        torch.set_num_threads(threads)
        device = "cuda" if res.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        tokenizer = load_tokenizer(m)
        kwargs = dict(
            revision=m.revision,
            trust_remote_code=m.trust_remote_code,
            use_safetensors=m.use_safetensors or None,  # None: prefer safetensors, fall back to pickle
            dtype=m.dtype,
        )
        if m.attn_implementation:
            kwargs["attn_implementation"] = m.attn_implementation
        # The replica's load is the model's check on a local Ray (the driver skips its meta model
        # there, jobs/validate.py): what cannot load is the job's bad input, said as the driver would.
        try:
            model, loading = AutoModelForCausalLM.from_pretrained(m.path, output_loading_info=True, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelError(f"model.path {m.path!r} does not load as a causal language model: {e}") from e
        if loading["missing_keys"]:  # tied weights are not missing
            raise missing_weights(m.path, loading["missing_keys"])
        model = model.to(device).eval()
        use_grouped_attention(model)  # the same bits as sdpa, without a copy of the cache per step
        named = m.adapter_set()
        if named:
            model = _with_adapters(model, named)
        context = context_length(model.config)
        budget = res.max_batch_tokens or res.batch_size * (context or 2048)
        grammars = None
        if structured_possible(spec):
            vocab = model.config.get_text_config().vocab_size  # the logits' width
            grammars = Grammars(tokenizer, vocab, structured.flexible(spec), threads)
        params = SamplingParams.from_spec(spec.generation)
        return cls(model, tokenizer, params, res.batch_size, budget, frozenset(named), grammars)

    # -- public API -----------------------------------------------------------------

    def submit(self, requests: Iterable[Request]) -> None:
        """Queue one shard's requests; they are admitted in one order with every other shard's
        (workers/admission.py: shared prefixes together, longest prompts first, aging)."""
        self.waiting.push(requests)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.running is not None

    def abort_all(self) -> list[Request]:
        aborted = list(self.waiting) + ([row.request for row in self.running.rows] if self.running else [])
        self.waiting.clear()
        self.running = None
        return aborted

    def stats(self) -> dict[str, int]:
        return dict(self.counters)

    def describe(self) -> dict:
        import transformers

        return {
            "engine": self.name,
            "engine_version": transformers.__version__,
            "device": str(self.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "commit_hash": getattr(self.model.config, "_commit_hash", None),
            "context_length": self.context_length,
            **({"adapters": sorted(self.adapters)} if self.adapters else {}),
        }

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Admit what fits, decode one token for every running sequence; return the finished."""
        finished: list[Completion] = []
        try:
            self._admit(finished)
            if self.running is not None:
                self._decode(finished)
        except Exception as e:
            self._recover(e, finished)
        return finished

    # -- admission and prefill -----------------------------------------------------------

    def _admit(self, finished: list[Completion]) -> None:
        running = self.running
        if running is not None and not self.splice:
            return
        free = self.batch_size - (len(running.rows) if running else 0)
        # Prefill in chunks worth the extra forward, not one row per step.
        if not self.waiting or free <= 0 or (running is not None and free < max(1, self.batch_size // 4)):
            return
        width = max((r.final_width for r in running.rows), default=0) if running else 0
        count = len(running.rows) if running else 0
        chunk: list[Request] = []
        prompt_width = prompt_sum = 0
        self.waiting.begin_admission()
        while self.waiting and len(chunk) < free:
            r = self.waiting.head()
            new_width = max(width, len(r.prompt_ids) + r.max_new_tokens)
            # The padded cache holds (rows x widest row) tokens; a single row always fits.
            if (count + 1) * new_width > self.max_batch_tokens and count > 0:
                break
            # One prefill pads every prompt to the chunk's longest: stop before padding
            # passes prefill_pad_limit of its positions, and prefill the rest on later
            # steps with prompts of their own length.
            pw, ps = max(prompt_width, len(r.prompt_ids)), prompt_sum + len(r.prompt_ids)
            if chunk and (len(chunk) + 1) * pw - ps > self.prefill_pad_limit * (len(chunk) + 1) * pw:
                break
            chunk.append(self.waiting.pop())
            width, count = new_width, count + 1
            prompt_width, prompt_sum = pw, ps
        if not chunk:
            return
        try:
            batch = self._prefill(chunk, finished)
        except Exception as e:
            # The chunk is at fault, not the running batch: that one decodes on.
            self._isolate(chunk, e, finished)
            return
        if batch is not None:
            self.running = batch if running is None else merge(running, batch)

    def _prefill(self, chunk: list[Request], finished: list[Completion]) -> Batch | None:
        from transformers import DynamicCache

        faults.inject(
            "engine.prefill",
            sequences=len(chunk),
            prompts=lambda: "\n".join(self.tokenizer.decode(list(r.prompt_ids)) for r in chunk),
        )
        rows = [Row(r, sampling.generator(r.seed, self.device), matcher=self._matcher(r)) for r in chunk]
        for row in rows:
            sampling.index_ngrams(row.ngrams, list(row.request.prompt_ids), self.params.no_repeat_ngram_size)
        cache = DynamicCache(config=self.model.config)
        self.splice = self.splice and spliceable(cache)
        if self.splice:
            slab_cache(cache)  # a step writes its token in place, not a copy of the whole cache
        shared = self._shared_prefix(chunk)
        input_ids, mask = _prompt_batch(chunk, shared, self.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        seen = None
        if self.params.repetition_penalty != 1.0:
            vocab = self.model.config.get_text_config().vocab_size
            seen = torch.zeros((len(chunk), vocab), dtype=torch.bool, device=self.device)
            # Padding points at the row's last real token, so every write is True
            # (duplicate scatter indices with different values are undefined on CUDA).
            seen.scatter_(1, torch.where(mask.bool(), input_ids, input_ids[:, -1:]), True)
        if shared:
            # The prefix once, as a batch of one; its cache then serves every row (a copy, not compute).
            self.model(
                input_ids=input_ids[:1, :shared],
                attention_mask=mask[:1, :shared],
                position_ids=positions[:1, :shared],
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **self._forward_kwargs(rows[:1]),
            )
            cache.batch_repeat_interleave(len(chunk))
        out = self.model(
            input_ids=input_ids[:, shared:],
            attention_mask=mask,
            position_ids=positions[:, shared:],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
            **self._forward_kwargs(rows),
        )
        skipped = (len(chunk) - 1) * shared
        self.counters["prefix_shared_tokens"] += skipped
        self.counters["forward_tokens"] += int(mask.sum()) - skipped
        self.counters["padded_tokens"] += mask.numel() - skipped
        self.counters["prefill_positions"] += mask.numel() - skipped
        self.splice = self.splice and spliceable(cache)
        batch = Batch(rows, cache, mask, positions[:, -1] + 1, input_ids[:, -1], seen)
        return self._sample_and_retire(batch, out.logits[:, -1, :].float(), finished)

    def _shared_prefix(self, chunk: list[Request]) -> int:
        """Leading prompt tokens that every row of `chunk` shares and one forward computes for all
        (0: each row prefills its whole prompt). Only where the cache can be spliced, and only for
        rows of one adapter (an adapter changes the prefix's keys and values)."""
        if not (self.prefix_share and self.splice) or len({r.adapter for r in chunk}) > 1:
            return 0
        return shared_prefix_len([r.prompt_ids for r in chunk])

    # -- decoding ------------------------------------------------------------------------

    def _decode(self, finished: list[Completion]) -> None:
        b = self.running
        if b.seen is not None:
            b.seen[torch.arange(len(b.rows), device=self.device), b.next_input] = True
        b.mask = torch.cat([b.mask, b.mask.new_ones((len(b.rows), 1))], dim=1)
        out = self.model(
            input_ids=b.next_input[:, None],
            attention_mask=b.mask,
            position_ids=b.next_pos[:, None],
            past_key_values=b.cache,
            use_cache=True,
            **self._forward_kwargs(b.rows),
        )
        self.counters["steps"] += 1
        self.counters["forward_tokens"] += len(b.rows)
        self.counters["padded_tokens"] += len(b.rows)
        b.next_pos = b.next_pos + 1
        self.running = self._sample_and_retire(b, out.logits[:, -1, :].float(), finished)

    def _sample_and_retire(self, b: Batch, logits: torch.Tensor, finished: list[Completion]) -> Batch | None:
        """Pick every row's next token; finished rows leave the batch (no more compute on them).
        The order is fixed: the grammar masks the logits, logprobs are read from what it
        allows (vLLM's raw_logprobs), then penalties and sampling choose."""
        self._constrain(b.rows, logits)
        scores = self._scores(b.rows, logits)  # (B, V) log-probabilities, or None
        tokens = sampling.next_tokens(self.params, logits, b.rows, b.seen)  # (B,)
        keep = []
        for i, (row, tok) in enumerate(zip(b.rows, tokens.tolist())):
            self._append(row, tok, None if scores is None else scores[i])
            if row.finish_reason is None:
                keep.append(i)
            else:
                finished.append(self._completion(row))
        if not keep:
            return None
        b.next_input = tokens
        if len(keep) < len(b.rows):
            b.keep(keep, trim=self.splice)
        return b

    def _append(self, row: Row, token: int, scores: torch.Tensor | None) -> None:
        if token in self.eos_ids:
            row.finish_reason = "stop"
            return
        row.tokens.append(token)
        self._note(row, token, scores)
        sampling.note_ngram(row, self.params.no_repeat_ngram_size)
        stop = (row.request.params or self.params).stop
        if stop:
            window = self.stop_window if row.request.params is None else _stop_window(stop)
            tail = self.tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
            if any(s in tail for s in stop):
                row.finish_reason = "stop"
                return
        if len(row.tokens) >= row.request.max_new_tokens:
            row.finish_reason = "length"
            return
        # As vLLM: a grammar completed on the last allowed token still reports "length".
        if self._grammar_done(row, token):
            row.finish_reason = "stop"

    # -- hooks of the optional features (off: they do nothing) ----------------------------

    def _matcher(self, request: Request) -> object | None:
        """The grammar state of a constrained request (structured output)."""
        if request.structured is None:
            return None
        if self.grammars is None:
            raise ValueError("a constrained request, on an engine built for a job without structured output")
        return self.grammars.matcher(request.structured)

    def _forward_kwargs(self, rows: list[Row]) -> dict:
        """Extra arguments of a forward over `rows`: with adapters, each row's (PEFT's mixed-adapter
        batch: every LoRA layer adds each adapter's product to its rows only). A plain model takes none."""
        if not self.adapters:
            return {}
        return {"adapter_names": [row.request.adapter or BASE for row in rows]}

    def _constrain(self, rows: list[Row], logits: torch.Tensor) -> None:
        """Mask, in place, what each constrained row's grammar does not allow next."""
        if self.grammars is not None:
            self.grammars.mask(logits, [row.matcher for row in rows])

    def _scores(self, rows: list[Row], logits: torch.Tensor) -> torch.Tensor | None:
        """(B, V) log-probabilities, when any row asked for logprobs."""
        if all(row.request.logprobs is None for row in rows):
            return None
        # A new tensor: sampling may write -inf into the logits in place (no-repeat n-grams).
        return torch.log_softmax(logits, dim=-1)

    def _note(self, row: Row, token: int, scores: torch.Tensor | None) -> None:
        """Keep the chosen token's logprob (and the step's top K) for a row that asked."""
        k = row.request.logprobs
        if k is None:
            return
        # Per row, (V,) scores: the chosen token is known only now, after sampling.
        logprob = float(scores[token])
        row.token_logprobs.append(logprob)
        if k:
            row.top_logprobs.append(_top(scores, token, logprob, k))

    def _grammar_done(self, row: Row, token: int) -> bool:
        """Feed the chosen token to the row's grammar; whether the grammar is complete."""
        return row.matcher is not None and Grammars.advance(row.matcher, token)

    def _completion(self, row: Row) -> Completion:
        self.counters["generated_tokens"] += len(row.tokens)
        text = completion_text(self.tokenizer, row.tokens, (row.request.params or self.params).stop)
        asked = row.request.logprobs
        return Completion(
            row.request.key,
            tuple(row.tokens),
            text,
            row.finish_reason or "length",
            token_logprobs=tuple(row.token_logprobs) if asked is not None else None,
            top_logprobs=tuple(row.top_logprobs) if asked else None,
        )

    # -- failures ----------------------------------------------------------------------

    def _recover(self, error: Exception, finished: list[Completion]) -> None:
        """A decode step failed: out of memory, or a sequence that breaks the model."""
        involved = [row.request for row in self.running.rows] if self.running else []
        self.running = None
        self._isolate(involved, error, finished)

    def _isolate(self, suspects: list[Request], error: Exception, finished: list[Completion]) -> None:
        """Restart the suspects in smaller batches (they reproduce exactly), until the
        one at fault runs alone and comes back as an error."""
        if _is_fatal_device_error(error):
            raise FatalDeviceError(str(error)) from error
        _free_device_memory()
        if len(suspects) == 1:
            reason = "out of memory for a single sequence" if _is_oom(error) else f"{type(error).__name__}: {error}"
            finished.append(Completion(suspects[0].key, (), "", "error", reason))
            if not _is_oom(error):
                self.batch_size = self._healthy_batch_size
            return
        self.batch_size = max(1, len(suspects) // 2)
        if _is_oom(error):
            self._healthy_batch_size = self.batch_size  # remembered for this replica
        log.warning(
            "%s with %d sequences; retrying at most %d at a time",
            "out of memory" if _is_oom(error) else f"{type(error).__name__}: {error}",
            len(suspects),
            self.batch_size,
        )
        self.waiting.push_front(suspects)


def _prompt_batch(chunk: list[Request], shared: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) token ids and mask of `chunk`'s prompts: their first `shared` tokens (the same in every
    row) in the leading columns, then each row's rest left-padded, so the last column is every row's
    newest token. With shared = 0 that is plain left padding; otherwise the padding sits between
    the prefix and the rest, which the mask covers (positions come from its cumsum)."""
    width = shared + max(len(r.prompt_ids) - shared for r in chunk)
    input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(chunk), width), dtype=torch.long)
    if shared:
        input_ids[:, :shared] = torch.tensor(chunk[0].prompt_ids[:shared])
        mask[:, :shared] = 1
    for i, r in enumerate(chunk):
        rest = len(r.prompt_ids) - shared
        input_ids[i, width - rest :] = torch.tensor(r.prompt_ids[shared:])
        mask[i, width - rest :] = 1
    return input_ids, mask


def _top(scores: torch.Tensor, chosen: int, logprob: float, k: int) -> TopLogprobs:
    """The k most likely tokens of (V,) `scores`, most likely first; tokens a grammar masked
    (-inf) are left out. When the chosen token ties the k-th, it is the one listed (as vLLM
    does: its rank, one plus the tokens more likely, is k)."""
    values, ids = torch.topk(scores, min(k, scores.shape[-1]))
    top = [(t, p) for t, p in zip(ids.tolist(), values.tolist()) if math.isfinite(p)]
    if len(top) == k and logprob >= top[-1][1] and chosen not in (t for t, _ in top):
        top[-1] = (chosen, logprob)
    return tuple(top)


def _with_adapters(model, named: dict):
    """`model` as a PeftModel holding every adapter under its name, in inference mode
    (PEFT refuses adapter_names in training mode)."""
    from peft import PeftModel

    first, *rest = sorted(named)
    peft_model = PeftModel.from_pretrained(model, named[first].path, adapter_name=first)
    for name in rest:
        peft_model.load_adapter(named[name].path, adapter_name=name)
    return peft_model.eval()


def _stop_window(stop: tuple[str, ...]) -> int:
    # Stop strings are found in the decoded tail of each sequence; a byte-level
    # token can be a quarter of a character, hence the factor 4.
    return 4 * max((len(s) for s in stop), default=0) + 4


def _is_oom(e: Exception) -> bool:
    return isinstance(e, torch.OutOfMemoryError)


def _is_fatal_device_error(e: Exception) -> bool:
    # After a CUDA error (device-side assert, illegal address) the context is
    # unusable; only a new process recovers.
    return isinstance(e, RuntimeError) and not _is_oom(e) and ("CUDA error" in str(e) or "CUBLAS_STATUS" in str(e))


def _free_device_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _pad_id(model, tokenizer) -> int:
    # Padding is masked out, so any valid id works when the tokenizer has none.
    for candidate in (tokenizer.pad_token_id, getattr(model.generation_config, "pad_token_id", None)):
        if candidate is not None:
            return candidate
    eos = _eos_ids(model, tokenizer)
    return min(eos) if eos else 0
