"""Paged latent KV cache: one [num_pages, page_size, 576] tensor per layer, a page allocator and
per-request block tables.

Page 0 is never handed out: CUDA-graph padding rows write into it, so a padded decode step can
never clobber a live request's cache.
"""
from __future__ import annotations

import math

import torch

import flashseek.ops as ops
from flashseek.ref import mla as ref_mla

PAGE_SIZE = 64
SCRATCH_PAGE = 0


class OutOfPages(RuntimeError):
    pass


class BlockAllocator:
    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise ValueError("the cache needs at least 2 pages (page 0 is scratch)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))   # pop() hands out low pages first
        self._owned: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owned)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfPages(f"need {n} pages, {len(self._free)} free of {self.capacity}")
        pages = [self._free.pop() for _ in range(n)]
        self._owned.update(pages)
        return pages

    def free(self, pages: list[int]) -> None:
        for p in pages:
            if p not in self._owned:
                raise ValueError(f"page {p} is not allocated (double free?)")
            self._owned.remove(p)
            self._free.append(p)


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int = PAGE_SIZE, dtype=torch.bfloat16,
                 device="cpu", fp8: bool = False):
        self.page_size = page_size
        self.num_pages = num_pages
        self.fp8 = fp8
        self.device = torch.device(device)
        self.layers = [self._empty(num_pages, page_size, dtype, fp8) for _ in range(num_layers)]
        self.allocator = BlockAllocator(num_pages)

    def _empty(self, num_pages, page_size, dtype, fp8):
        fn = getattr(ops, "empty_mla_cache", None)
        if fn is not None and (fp8 or dtype == torch.bfloat16):
            return fn(num_pages, page_size, fp8, self.device)
        if fp8:
            return torch.zeros(num_pages, page_size, ref_mla.FP8_TOKEN_BYTES, dtype=torch.uint8, device=self.device)
        return torch.zeros(num_pages, page_size, ref_mla.D_QK, dtype=dtype, device=self.device)

    @staticmethod
    def pages_for_budget(bytes_budget: int, num_layers: int, page_size: int = PAGE_SIZE, fp8: bool = False,
                         dtype=torch.bfloat16) -> int:
        per_token = ref_mla.FP8_TOKEN_BYTES if fp8 else ref_mla.D_QK * torch.empty((), dtype=dtype).element_size()
        return max(2, bytes_budget // (per_token * page_size * num_layers))

    def pages_needed(self, num_tokens: int) -> int:
        return math.ceil(num_tokens / self.page_size)

    @property
    def bytes_total(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.layers)

    def usage(self) -> dict:
        a = self.allocator
        return {"pages_used": a.num_used, "pages_total": a.capacity, "page_size": self.page_size,
                "fraction": a.num_used / a.capacity if a.capacity else 0.0,
                "bytes_total": self.bytes_total}


class BlockTable:
    """The pages of one request, grown as its tokens are appended."""

    def __init__(self, cache: PagedKVCache):
        self.cache = cache
        self.pages: list[int] = []

    def ensure(self, num_tokens: int) -> None:
        need = self.cache.pages_needed(num_tokens) - len(self.pages)
        if need > 0:
            self.pages += self.cache.allocator.allocate(need)

    def slots(self, start: int, end: int) -> list[int]:
        ps = self.cache.page_size
        return [self.pages[t // ps] * ps + t % ps for t in range(start, end)]

    def release(self) -> None:
        if self.pages:
            self.cache.allocator.free(self.pages)
            self.pages = []
