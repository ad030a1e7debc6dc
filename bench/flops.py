"""Model FLOPs and the machine's matrix-multiply peak, measured in the same run."""

from __future__ import annotations

import time

from bench.model import ModelShape


def sequence_flops(shape: ModelShape, prompt_len: int, new_tokens: int) -> float:
    """Forward FLOPs one sequence needs: prefill of `prompt_len` tokens, then `new_tokens` decode steps.

    Per token: 2 x (transformer body params) for the matmuls, plus attention
    2 x layers x context x hidden (QK^T and AV against `context` earlier tokens,
    the Kaplan et al. estimate); the lm_head (2 x hidden x vocab) only where a
    next token is picked: the last prompt position and every decode step but
    the last, whose token is never fed back. Padding and recomputation are not
    counted: these are the FLOPs the model needs, whoever computes them."""
    p = shape.params()
    dense = 2 * p["body"]
    head = 2 * p["lm_head"]
    total_positions = prompt_len + max(new_tokens - 1, 0)  # the last new token is never fed back
    # Sum of contexts 1..total_positions (causal attention sees itself and everything before).
    attn = 2 * shape.layers * shape.hidden * total_positions * (total_positions + 1) / 2
    return dense * total_positions + attn + head * max(new_tokens, 0)


def skipped_prompt_flops(shape: ModelShape, skipped_positions: int) -> float:
    """The matmul FLOPs of prompt positions a system never ran (a prefix cache served their KV,
    or a shared prefix was prefilled once): taken off sequence_flops for MFU, which counts work
    done. Their attention rows are left in (a few percent at these lengths), so MFU errs high."""
    return 2 * shape.params()["body"] * skipped_positions


def matmul_peak(device: str = "cpu", dtype: str = "float32", n: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of an (n x n) @ (n x n) matmul over a few timed repeats."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)  # warm-up: thread pool, kernels
    sync()
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        reps = 10 if device.startswith("cuda") else 1
        t = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b)
        sync()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t))
    return best
