"""Sampling parameters and the per-request sampler (greedy, temperature, top-k, top-p; seeded)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Optional

import torch


def _is_int(x) -> bool:  # numpy integers included, bools not
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0          # 0 means greedy
    top_k: int = 0                    # 0 or -1 disables
    top_p: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False
    stop_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        # Checked here, not when a token is drawn: a NaN temperature or a fractional top_k would
        # otherwise surface as an error from inside a batched decode step, or as garbage tokens.
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, numbers.Real) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        bad = [t for t in self.stop_token_ids if not _is_int(t)]
        if bad:
            raise ValueError(f"stop_token_ids must be integers, got {bad[:8]!r}")
        # Plain Python numbers from here on (torch.Generator.manual_seed takes no numpy integer).
        self.max_tokens, self.top_k = int(self.max_tokens), int(self.top_k)
        self.temperature, self.top_p = float(self.temperature), float(self.top_p)
        self.seed = None if self.seed is None else int(self.seed)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


class Sampler:
    """One per request: its own generator makes a seeded request independent of the batch around it."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device="cpu")
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits [V] fp32 -> token id."""
        p = self.params
        if p.greedy:
            return int(torch.argmax(logits))
        x = logits.float().cpu() / p.temperature
        if p.top_k and p.top_k > 0 and p.top_k < x.numel():
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = sorted_x.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
            drop = probs.cumsum(-1) - probs >= p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter(0, order, sorted_x)
        probs = x.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
