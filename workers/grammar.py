"""Grammar state for structured output on the replica: llguidance matchers over the model's tokenizer.

The transformers engine asks for a matcher per constrained sequence, masks
each step's logits with every constrained row's allowed tokens, and feeds the
chosen token back. The check stage (workers/stages/structured.py) re-runs a
finished sequence's tokens through a fresh matcher, on either engine. The
grammars are jobs/core/structured.py's, the ones vLLM's guidance backend
builds, so both engines allow the same tokens at every step.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from functools import cached_property
from typing import TYPE_CHECKING

from jobs.core.structured import Structured, grammar

if TYPE_CHECKING:  # torch is imported in mask(): the driver imports this module (workers.replica,
    import torch  # to launch the actor) and must not pay ~0.8 core-seconds of torch for it

COMPILED = 1024  # distinct constraints kept compiled (a job's, or one per distinct row schema)


class Grammars:
    """Matchers of one tokenizer: each distinct constraint compiled once, copied per sequence."""

    def __init__(self, hf_tokenizer, vocab: int, flexible: bool, threads: int):
        """`vocab`: the model's logits width (ids the tokenizer lacks, padded embeddings, are never
        allowed); `threads`: for computing a batch's masks (llguidance's default is 80% of the node's CPUs).
        Nothing is built until the first constrained sequence: a batch job whose lines ask for no
        constraint needs no tokenizer llguidance takes."""
        self._hf_tokenizer, self._vocab, self._threads = hf_tokenizer, vocab, threads
        self.flexible = flexible
        self._compiled: OrderedDict[Structured, object] = OrderedDict()
        self._lock = threading.Lock()  # the check stage serves every shard in flight

    @cached_property
    def tokenizer(self):
        import llguidance.hf

        # As vLLM's guidance backend builds it (backend_guidance.py): masks of the same width, and the
        # tokenizer's own end-of-sequence token the one a complete grammar allows.
        return llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=max(self._vocab, len(self._hf_tokenizer)))

    @cached_property
    def words(self) -> int:
        return (self.tokenizer.vocab_size + 31) // 32  # int32 words of one row's bitmask

    @cached_property
    def executor(self):
        import llguidance

        return llguidance.LLExecutor(num_threads=self._threads)

    def matcher(self, s: Structured):
        """A fresh llguidance matcher for `s`; ValueError when llguidance cannot compile it."""
        import llguidance

        with self._lock:
            template = self._compiled.get(s)
            if template is None:
                template = llguidance.LLMatcher(self.tokenizer, grammar(s, self.flexible), log_level=0)
                if template.is_error():
                    raise ValueError(f"llguidance cannot use this constraint: {template.get_error()}")
                self._compiled[s] = template
                if len(self._compiled) > COMPILED:
                    self._compiled.popitem(last=False)
            else:
                self._compiled.move_to_end(s)
            return template.deep_copy()

    def mask(self, logits: torch.Tensor, matchers: list) -> None:
        """Set to -inf, in place, every token a row's matcher does not allow next; (B, V) float
        logits (V at most the `vocab` given), one matcher (or None: unconstrained) per row."""
        import torch

        active = [i for i, m in enumerate(matchers) if m is not None]
        if not active:
            return
        # (A, W) one bit per token, bit t % 32 of word t // 32, for the A constrained rows.
        bits = torch.zeros((len(active), self.words), dtype=torch.int32)
        self.executor.unsafe_compute_mask_ptr(
            [(matchers[i], a) for a, i in enumerate(active)], bits.data_ptr(), self.words * 4, len(active)
        )
        shifts = torch.arange(32, dtype=torch.int32)
        vocab = logits.shape[1]
        allowed = ((bits.unsqueeze(-1) >> shifts) & 1).view(len(active), -1)[:, :vocab].bool()  # (A, W*32) -> (A, V)
        index = torch.tensor(active, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))

    @staticmethod
    def advance(matcher, token: int) -> bool:
        """Feed the chosen token to a row's matcher; whether its grammar is complete (only the
        end of the sequence may follow)."""
        if not matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused a token its own mask allowed: {matcher.get_error()}")
        return matcher.is_stopped()

    def satisfied(self, s: Structured, token_ids) -> tuple[bool, str]:
        """Whether the tokens, from the first, make a whole completion of `s`; and why not."""
        m = self.matcher(s)
        if not m.consume_tokens(list(token_ids)):
            return False, m.get_error()
        return m.is_accepting(), ""
