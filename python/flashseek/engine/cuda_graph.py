"""CUDA-graph capture of pure-decode steps for common batch sizes.

A decode step of b requests replays the graph of the smallest captured size >= b. Padding rows
have slot -1 (their latent is not written) and length 0 (attention returns 0 for them), so they
cannot touch any request's cache; their logits are dropped.
"""
from __future__ import annotations

import warnings

import torch

from flashseek.models.deepseek.layers import AttnMetadata

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)


class DecodeGraphRunner:
    def __init__(self, model, cache, max_batch: int = 128, sizes=CAPTURE_SIZES):
        self.model = model
        self.cache = cache
        self.sizes = sorted(s for s in sizes if s <= max_batch)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.disabled_reason = None
        dev = model.device
        n = max(self.sizes) if self.sizes else 0
        self.max_pages = cache.allocator.capacity + 1
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros((n, self.max_pages), dtype=torch.int32, device=dev)
        self.cache_seqlens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.logits: dict[int, torch.Tensor] = {}
        try:
            self._capture_all()
        except Exception as exc:  # an op that is not capturable (e.g. a host-synchronizing fallback)
            self.graphs.clear()
            self.disabled_reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"flashseek: CUDA graphs disabled, decode runs eagerly ({self.disabled_reason})")

    def _meta(self, b: int) -> AttnMetadata:
        return AttnMetadata(positions=self.positions[:b], slot_mapping=self.slot_mapping[:b],
                            block_tables=self.block_tables[:b], cache_seqlens=self.cache_seqlens[:b], num_decode=b)

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.model.device)
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for b in reversed(self.sizes):
                for _ in range(2):  # warm-up: lazy library handles and workspaces before capture
                    self.model.forward(self.input_ids[:b], self._meta(b), self.cache.layers)
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    self.logits[b] = self.model.forward(self.input_ids[:b], self._meta(b), self.cache.layers)
                self.graphs[b] = g
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize(self.model.device)

    def can_run(self, b: int) -> bool:
        return bool(self.graphs) and b <= max(self.graphs)

    def run(self, tokens, positions, slots, table: torch.Tensor, seqlens: torch.Tensor) -> torch.Tensor:
        b = len(tokens)
        size = next(s for s in self.sizes if s >= b)
        dev = self.model.device
        self.input_ids[:b].copy_(torch.tensor(tokens, dtype=torch.int64), non_blocking=True)
        self.positions[:b].copy_(torch.tensor(positions, dtype=torch.int64), non_blocking=True)
        self.slot_mapping[:b].copy_(torch.tensor(slots, dtype=torch.int64), non_blocking=True)
        self.slot_mapping[b:size].fill_(-1)
        self.block_tables[:b, : table.shape[1]].copy_(table.to(dev, non_blocking=True))
        self.cache_seqlens[:b].copy_(seqlens.to(dev, non_blocking=True))
        self.cache_seqlens[b:size].zero_()
        self.graphs[size].replay()
        return self.logits[size][:b]
