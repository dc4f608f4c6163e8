"""Direct model driving for one or a few sequences without the scheduler: prefill a prompt (in
chunks if asked), then decode token by token. Tests and benchmarks use it to read every logit."""
from __future__ import annotations

from typing import Optional

import torch

from flashseek.engine.kv_cache import PAGE_SIZE, SCRATCH_PAGE, BlockTable, PagedKVCache
from flashseek.models.deepseek.layers import AttnMetadata, PrefillSeq


class Session:
    def __init__(self, model, num_seqs: int = 1, max_len: int = 1024, cache: Optional[PagedKVCache] = None,
                 page_size: int = PAGE_SIZE, kv_cache_fp8: bool = False):
        self.model = model
        pages = num_seqs * -(-max_len // page_size) + 1
        self.cache = cache or PagedKVCache(model.cfg.num_hidden_layers, pages, page_size, model.cache_dtype,
                                           model.device, fp8=kv_cache_fp8)
        self.tables = [BlockTable(self.cache) for _ in range(num_seqs)]
        self.lens = [0] * num_seqs

    def _table(self, rows: list[int]) -> torch.Tensor:
        width = max(len(self.tables[r].pages) for r in rows)
        t = torch.full((len(rows), width), SCRATCH_PAGE, dtype=torch.int32)
        for i, r in enumerate(rows):
            t[i, : len(self.tables[r].pages)] = torch.tensor(self.tables[r].pages, dtype=torch.int32)
        return t.to(self.model.device)

    def prefill(self, ids: list[int], seq: int = 0, chunk: Optional[int] = None) -> torch.Tensor:
        """Logits of every prompt token, [len(ids), V] fp32."""
        chunk = chunk or len(ids)
        out = []
        for c0 in range(0, len(ids), chunk):
            part = ids[c0: c0 + chunk]
            start = self.lens[seq]
            end = start + len(part)
            tb = self.tables[seq]
            tb.ensure(end)
            dev = self.model.device
            meta = AttnMetadata(
                positions=torch.arange(start, end, device=dev),
                slot_mapping=torch.tensor(tb.slots(start, end), dtype=torch.int64, device=dev),
                block_tables=self._table([seq]), cache_seqlens=torch.tensor([end], dtype=torch.int32, device=dev),
                num_decode=0, prefills=[PrefillSeq(0, len(part), 0, end)])
            out.append(self.model.forward(torch.tensor(part, device=dev), meta, self.cache.layers))
            self.lens[seq] = end
        return torch.cat(out)

    def decode(self, tokens: list[int], seqs: Optional[list[int]] = None) -> torch.Tensor:
        """One decode step of the given sequences (default all): logits [len(seqs), V]."""
        seqs = list(range(len(self.tables))) if seqs is None else seqs
        dev = self.model.device
        slots, pos = [], []
        for s in seqs:
            n = self.lens[s]
            self.tables[s].ensure(n + 1)
            slots += self.tables[s].slots(n, n + 1)
            pos.append(n)
            self.lens[s] = n + 1
        meta = AttnMetadata(
            positions=torch.tensor(pos, device=dev), slot_mapping=torch.tensor(slots, device=dev),
            block_tables=self._table(seqs),
            cache_seqlens=torch.tensor([self.lens[s] for s in seqs], dtype=torch.int32, device=dev),
            num_decode=len(seqs))
        return self.model.forward(torch.tensor(tokens, device=dev), meta, self.cache.layers)

    def greedy(self, prompt: list[int], steps: int, seq: int = 0) -> tuple[list[int], list[torch.Tensor]]:
        """Greedy continuation: (tokens, logits of each step [V])."""
        logits = self.prefill(prompt, seq)[-1]
        toks, all_logits = [], [logits]
        for i in range(steps):
            t = int(torch.argmax(logits))
            toks.append(t)
            if i + 1 < steps:
                logits = self.decode([t], [seq])[0]
                all_logits.append(logits)
        return toks, all_logits
