"""Continuous-batching engine: requests join and leave between steps; each step mixes one decode
token per running request with prefill chunks under a token budget.

Admission reserves the pages a request can ever need (prompt + max_tokens), so a running request
never runs out of cache and nothing needs preempting; pages are still allocated lazily as the
request grows, which is what the KV-cache use reports.
"""
from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from flashseek.engine.kv_cache import SCRATCH_PAGE, BlockTable, PagedKVCache
from flashseek.engine.sampling import Sampler, SamplingParams
from flashseek.models.deepseek.layers import AttnMetadata, PrefillSeq

_ids = itertools.count()


@dataclass
class Request:
    prompt: list
    params: SamplingParams
    on_token: Optional[Callable] = None          # on_token(request, token_id)
    id: int = field(default_factory=lambda: next(_ids))
    output: list = field(default_factory=list)
    num_computed: int = 0                        # tokens whose latent is in the cache
    finish_reason: Optional[str] = None
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first_token: Optional[float] = None
    t_finish: Optional[float] = None
    block_table: Optional[BlockTable] = None
    sampler: Optional[Sampler] = None
    reserved_pages: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < len(self.prompt)

    def token_at(self, i: int) -> int:
        n = len(self.prompt)
        return self.prompt[i] if i < n else self.output[i - n]

    @property
    def ttft_s(self) -> Optional[float]:
        return None if self.t_first_token is None else self.t_first_token - self.t_arrival

    @property
    def tpot_s(self) -> Optional[float]:
        if self.t_finish is None or self.t_first_token is None or len(self.output) < 2:
            return None
        return (self.t_finish - self.t_first_token) / (len(self.output) - 1)


@dataclass
class Scheduled:
    req: Request
    start: int
    length: int


@dataclass
class StepStats:
    num_decode: int
    num_prefill_tokens: int
    seconds: float


class Engine:
    def __init__(self, model, cache: PagedKVCache, max_num_seqs: int = 64, max_num_batched_tokens: int = 2048,
                 graph_runner=None):
        self.model = model
        self.cache = cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.graph_runner = graph_runner
        self.eos = set(model.cfg.eos_token_id)
        self.step_stats: list[StepStats] = []
        self.max_model_len = min(cache.allocator.capacity * cache.page_size, model.rope.max_positions)

    # ---- requests -----------------------------------------------------------------------------
    def add_request(self, prompt: list, params: Optional[SamplingParams] = None,
                    on_token: Optional[Callable] = None) -> Request:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("a prompt needs at least one token")
        bad = [t for t in prompt if not 0 <= t < self.model.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt token ids out of range [0, {self.model.cfg.vocab_size}): {bad[:8]}")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_tokens ({params.max_tokens}) = {total} exceeds the "
                             f"model length ({self.max_model_len} tokens: the KV cache or max_position_embeddings)")
        req = Request(prompt=prompt, params=params, on_token=on_token)
        req.sampler = Sampler(params)
        req.block_table = BlockTable(self.cache)
        # The last sampled token is never fed back, so its latent never needs a slot.
        req.reserved_pages = self.cache.pages_needed(total - 1)
        self.waiting.append(req)
        return req

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def _outstanding_reservations(self) -> int:
        return sum(r.reserved_pages - len(r.block_table.pages) for r in self.running)

    # ---- scheduling ---------------------------------------------------------------------------
    def schedule(self) -> list[Scheduled]:
        budget = self.max_num_batched_tokens
        decodes, prefills = [], []
        for r in self.running:
            if not r.in_prefill and budget > 0:
                decodes.append(Scheduled(r, r.num_computed, 1))
                budget -= 1
        for r in self.running:
            if r.in_prefill and budget > 0:
                n = min(len(r.prompt) - r.num_computed, budget)
                prefills.append(Scheduled(r, r.num_computed, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            if r.reserved_pages > self.cache.allocator.num_free - self._outstanding_reservations():
                break
            self.waiting.popleft()
            self.running.append(r)
            n = min(len(r.prompt), budget)
            prefills.append(Scheduled(r, 0, n))
            budget -= n
        if not decodes and not prefills and self.waiting and not self.running:
            r = self.waiting[0]
            raise RuntimeError(f"request {r.id} needs {r.reserved_pages} pages but the cache has only "
                               f"{self.cache.allocator.capacity}")
        return decodes + prefills

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Request]:
        batch = self.schedule()
        if not batch:
            return []
        t0 = time.perf_counter()
        device = self.model.device
        num_decode = sum(1 for s in batch if s.length == 1 and not s.req.in_prefill)
        tokens, positions, slots, prefills, last_idx = [], [], [], [], []
        for row, s in enumerate(batch):
            s.req.block_table.ensure(s.start + s.length)
            if row >= num_decode:
                prefills.append(PrefillSeq(start=len(tokens), q_len=s.length, row=row, ctx_len=s.start + s.length))
            tokens += [s.req.token_at(i) for i in range(s.start, s.start + s.length)]
            positions += list(range(s.start, s.start + s.length))
            slots += s.req.block_table.slots(s.start, s.start + s.length)
            last_idx.append(len(tokens) - 1)
        max_pages = max(len(s.req.block_table.pages) for s in batch)
        table = torch.full((len(batch), max_pages), SCRATCH_PAGE, dtype=torch.int32)
        for row, s in enumerate(batch):
            table[row, : len(s.req.block_table.pages)] = torch.tensor(s.req.block_table.pages, dtype=torch.int32)
        seqlens = torch.tensor([s.start + s.length for s in batch], dtype=torch.int32)

        if num_decode == len(batch) and self.graph_runner is not None and self.graph_runner.can_run(num_decode):
            logits = self.graph_runner.run(tokens, positions, slots, table, seqlens)
        else:
            meta = AttnMetadata(
                positions=torch.tensor(positions, dtype=torch.int64, device=device),
                slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
                block_tables=table.to(device), cache_seqlens=seqlens.to(device),
                num_decode=num_decode, prefills=prefills)
            logits = self.model.forward(torch.tensor(tokens, dtype=torch.int64, device=device), meta,
                                        self.cache.layers,
                                        torch.tensor(last_idx, dtype=torch.int64, device=device))
        logits = logits.float().cpu()
        now = time.perf_counter()
        finished = []
        for row, s in enumerate(batch):
            r = s.req
            r.num_computed = s.start + s.length
            if r.in_prefill:
                continue  # a chunk that does not finish the prompt samples nothing
            tok = r.sampler(logits[row])
            r.output.append(tok)
            if r.t_first_token is None:
                r.t_first_token = now
            if r.on_token is not None:
                r.on_token(r, tok)
            p = r.params
            if not p.ignore_eos and tok in self.eos:
                r.finish_reason = "eos"
            elif tok in p.stop_token_ids:
                r.finish_reason = "stop"
            elif len(r.output) >= p.max_tokens:
                r.finish_reason = "length"
            if r.finished:
                r.t_finish = now
                r.block_table.release()
                finished.append(r)
        if finished:
            self.running = [r for r in self.running if not r.finished]
        self.step_stats.append(StepStats(num_decode, sum(s.length for s in batch[num_decode:]),
                                         time.perf_counter() - t0))
        return finished

    def run_to_completion(self) -> None:
        while self.has_unfinished():
            self.step()
