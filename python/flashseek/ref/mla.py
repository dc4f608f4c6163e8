"""Paged MLA latent decode (DeepSeek-V3 absorbed attention): the specification and CPU implementation.

Shapes (one latent KV head shared by every query head):
  q            [b, s_q, h_q, 576]   bf16 / fp16: 512 absorbed latent dims | 64 rope dims
  kv_cache     bf16  [num_pages, page_size, 576]: 512 latent | 64 roped k. V is the first 512 dims.
               FP8   uint8 [num_pages, page_size, 656]: per token 512 e4m3 latent values, then 4
               fp32 scales (one per 128 latent values, scale = max(amax, 1e-4) / 448, value =
               e4m3 * scale), then 64 bf16 rope values (FlashMLA's sparse-path token layout).
  block_table  int32 [b, max_pages]: token t of request i lives in page block_table[i, t // page_size]
               at offset t % page_size. Only the first ceil(len / page_size) entries are read.
  cache_seqlens int32 [b]: 0 <= len <= max_pages * page_size.
  out          [b, s_q, h_q, 512] in q's dtype;  lse [b, h_q, s_q] fp32, natural log.

Query i of s_q (causal, bottom-right aligned, for speculative verification) sees the first
len - s_q + i + 1 keys; without causal every query sees all len keys. A query that sees no key
gets out = 0 and lse = -inf (an empty sequence, or causal with len < s_q).

The plan (`mla_decode_plan`) is the split-KV schedule of the CUDA kernel: the math here ignores
it, but it is computed (same algorithm as the device) and validated so both paths agree.
"""
from __future__ import annotations

import math

import torch

from flashseek.ref.norm import rms_norm
from flashseek.ref.quant import AMAX_FLOOR, FP8_MAX, block_scales

D_QK = 576          # latent 512 + rope 64
D_V = 512           # V = first 512 dims of each cached token
D_ROPE = 64
FP8_TOKEN_BYTES = 656  # 512 e4m3 + 4 fp32 scales + 64 bf16
QUANT_BLOCK = 128
PAGE_SIZES = (16, 32, 64, 128)

# Split-KV schedule constants, shared with csrc/mla/mla_params.h.
BLOCK_N = 64          # keys per kernel step (and the unit of the schedule)
BLOCK_M = 64          # packed query rows (s_q * h_q) per CTA
FIXED_SPLIT_COST = 5  # cost of one split in key blocks: Q load, pipeline fill, partial write + combine
# A part's share is at least this many key blocks: for tiny totals (one request of a few thousand
# keys) ceil(total / P) is 1 block, and 64 one-block splits measured slower than 32 two-block ones
# (H100, b=1 s_k=4096 h_q=16, graph replay: 19.0 vs 16.1 us bf16, 19.4 vs 15.5 FP8).
MIN_SPLIT_BLOCKS = 2
PLAN_PART_INTS = 8    # ints per sm part: b0, blk0, b1, blk1, split0, split_req, its ws_base, its n


def is_fp8_cache(kv_cache: torch.Tensor) -> bool:
    return kv_cache.dtype == torch.uint8


def plan_size(batch: int, num_sm_parts: int) -> int:
    """Number of int32 in a plan: PLAN_PART_INTS per sm part, then (ws_base, num_splits) per request."""
    return PLAN_PART_INTS * num_sm_parts + 2 * batch


def plan_num_sm_parts(plan_numel: int, batch: int) -> int:
    """Inverse of plan_size, or -1 when the size matches no plan for this batch."""
    rest = plan_numel - 2 * batch
    if rest < PLAN_PART_INTS or rest % PLAN_PART_INTS:
        return -1
    return rest // PLAN_PART_INTS


def workspace_slots(num_sm_parts: int) -> int:
    """Split-KV partial slots needed by any plan with num_sm_parts parts.

    Only the last part takes its remainder without limit, so at most num_sm_parts - 1 part
    boundaries fall inside a request; a request cut k times has k + 1 <= 2k splits, hence 2 * parts.
    """
    return 2 * num_sm_parts


def _walk(nblk: list[int], payload: int, P: int, last_takes_rest: bool = False):
    """The greedy walk of the schedule: requests laid end to end in key blocks, each split costing
    FIXED_SPLIT_COST extra, every part taking `payload` cost units (with last_takes_rest, the last part
    takes whatever is left), pieces cut only where more than FIXED_SPLIT_COST units remain.
    Returns each part's (b0, blk0, b1, blk1, split0), each request's split count, and how many
    requests the P parts covered."""
    b = len(nblk)
    parts, nsplits = [], [0] * b
    i, blk, cur_split = 0, 0, 0
    for p in range(P):
        rem = 1 << 62 if last_takes_rest and p == P - 1 else payload
        b0, blk0, split0 = i, blk, cur_split
        last_b, last_blk = b0 - 1, 0
        while i < b:
            rest = nblk[i] - blk
            if rest + FIXED_SPLIT_COST <= rem:
                rem -= rest + FIXED_SPLIT_COST
                nsplits[i] = cur_split + 1
                last_b, last_blk = i, nblk[i]
                i, blk, cur_split = i + 1, 0, 0
            else:
                take = rem - FIXED_SPLIT_COST
                if take > 0:
                    blk += take
                    cur_split += 1
                    last_b, last_blk = i, blk
                break
        parts.append((b0, blk0, last_b, last_blk, split0))
    return parts, nsplits, i


def _walk_fits(nblk: list[int], payload: int, P: int) -> bool:
    """Whether the greedy walk with `payload` cost units per part covers every request in P parts."""
    return _walk(nblk, payload, P)[2] >= len(nblk)


def plan_payload(nblk: list[int], P: int) -> int:
    """Cost units per part: the smallest payload with which the greedy walk fits in P parts (the cost
    model's makespan), at least MIN_SPLIT_BLOCKS + FIXED_SPLIT_COST. P parts of fewer than
    ceil(total / P) units cannot hold the total, so the search starts there and ends at FlashMLA's
    payload, that + FIXED_SPLIT_COST, which is kept when nothing smaller fits (the last part then takes
    the rest)."""
    total = sum(n + FIXED_SPLIT_COST for n in nblk)
    per_part = (total + P - 1) // P
    hi = max(per_part, MIN_SPLIT_BLOCKS) + FIXED_SPLIT_COST
    lo = max(per_part, MIN_SPLIT_BLOCKS + FIXED_SPLIT_COST)
    return next((c for c in range(lo, hi + 1) if _walk_fits(nblk, c, P)), hi)


def cluster_pair_request(plan: list, c: int, P: int, nsplits: list) -> int:
    """The request whose two pieces are exactly parts c and c + 1 (c even), each holding nothing else, or
    -1: a decode launched in 2-CTA clusters along the parts merges it in shared memory, and the plan's
    split list marks it with a negative split count (the combine skips it when the decode ran clustered)."""
    e0, e1 = plan[PLAN_PART_INTS * c: PLAN_PART_INTS * c + 3], plan[PLAN_PART_INTS * (c + 1): PLAN_PART_INTS * (c + 1) + 3]
    r = e0[0]
    if r < 0 or r >= len(nsplits) or e0[2] != r or e1[0] != r or e1[2] != r:
        return -1
    return r if nsplits[r] == 2 else -1


def mla_decode_plan(cache_seqlens: torch.Tensor, s_q: int, h_q: int, num_sm_parts: int) -> torch.Tensor:
    """Greedy FlashMLA-style schedule: requests laid end to end in key blocks, each split costing
    FIXED_SPLIT_COST extra blocks, cut into runs of plan_payload cost units (the smallest that fits
    in num_sm_parts parts), pieces of at least MIN_SPLIT_BLOCKS blocks (parts past the work stay
    empty).

    Part p (ints [8p, 8p+8)) covers requests b0..b1 (b1 < b0: nothing), starting at key block blk0
    of b0 and ending before block blk1 of b1; split0 is the split ordinal of its first piece.
    split_req of part p is the p-th request with more than one split (-1, 0, 0 past the last), then
    that request's ws_base and num_splits, negated for a cluster pair (cluster_pair_request): the
    combine's work list (each split request holds one of the P - 1 part boundaries, so at most P - 1).
    Then per request i: ws_base (first workspace slot of its partials, meaningful when it has more
    than one split) and num_splits. s_q and h_q do not change the schedule (the kernel's cost per
    block is the same for every request); they are part of the API so a cost model may use them.
    """
    lens = [max(int(x), 0) for x in cache_seqlens.cpu().tolist()]
    b, P = len(lens), num_sm_parts
    nblk = [(n + BLOCK_N - 1) // BLOCK_N for n in lens]
    payload = plan_payload(nblk, P)
    plan = [0] * plan_size(b, P)
    parts, nsplits, _ = _walk(nblk, payload, P, last_takes_rest=True)
    for p, entries in enumerate(parts):
        plan[PLAN_PART_INTS * p: PLAN_PART_INTS * p + 6] = list(entries) + [-1]
    pairs = {cluster_pair_request(plan, c, P, nsplits) for c in range(0, P - 1, 2)} - {-1}
    ws, n_split = 0, 0
    for i in range(b):
        plan[PLAN_PART_INTS * P + 2 * i] = ws
        plan[PLAN_PART_INTS * P + 2 * i + 1] = nsplits[i]
        if nsplits[i] > 1:
            ws += nsplits[i]
            n = -nsplits[i] if i in pairs else nsplits[i]
            plan[PLAN_PART_INTS * n_split + 5: PLAN_PART_INTS * n_split + 8] = [i, ws - nsplits[i], n]
            n_split += 1
    assert ws <= workspace_slots(P) and n_split < P
    return torch.tensor(plan, dtype=torch.int32, device=cache_seqlens.device)


# ---------------------------------------------------------------------------------------------
# FP8 cache layout
# ---------------------------------------------------------------------------------------------
def quantize_tokens(latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
    """latent [t, 512], k_rope [t, 64] -> uint8 [t, 656] FP8 cache tokens (quantized in fp32)."""
    t = latent.shape[0]
    xb = latent.float().reshape(t, D_V // QUANT_BLOCK, QUANT_BLOCK)
    s = block_scales(xb.abs().amax(dim=-1), ue8m0=False)
    q = (xb / s.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).reshape(t, D_V)
    out = torch.empty((t, FP8_TOKEN_BYTES), dtype=torch.uint8, device=latent.device)
    out[:, :D_V] = q.view(torch.uint8)
    out[:, D_V:D_V + 16] = s.contiguous().view(torch.uint8).reshape(t, 16)
    out[:, D_V + 16:] = k_rope.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(t, 2 * D_ROPE)
    return out


def dequantize_tokens(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 656] FP8 cache tokens -> fp32 [..., 576] (exact: e4m3 * fp32 scale, bf16 rope)."""
    lead = raw.shape[:-1]
    r = raw.reshape(-1, FP8_TOKEN_BYTES)
    q = r[:, :D_V].contiguous().view(torch.float8_e4m3fn).float()
    s = r[:, D_V:D_V + 16].contiguous().view(torch.float32)
    rope = r[:, D_V + 16:].contiguous().view(torch.bfloat16).float()
    lat = (q.reshape(-1, D_V // QUANT_BLOCK, QUANT_BLOCK) * s.unsqueeze(-1)).reshape(-1, D_V)
    return torch.cat([lat, rope], dim=-1).reshape(*lead, D_QK)


def cache_as_float(kv_cache: torch.Tensor) -> torch.Tensor:
    """The cache's values in fp32 [num_pages, page_size, 576], whatever its layout."""
    return dequantize_tokens(kv_cache) if is_fp8_cache(kv_cache) else kv_cache.float()


def mla_cache_append(latent: torch.Tensor, k_rope: torch.Tensor, kv_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """Writes token j to slot slot_mapping[j] (page * page_size + offset); negative slots are skipped.
    A bf16 cache gets the values rounded to bf16; an FP8 cache gets them quantized per 128."""
    num_pages, page_size = kv_cache.shape[:2]
    slots = slot_mapping.long()
    if ((slots >= num_pages * page_size)).any():
        raise ValueError(f"flashseek: slot_mapping entries must be < num_pages * page_size = "
                         f"{num_pages * page_size}, got max {int(slots.max())}")
    keep = slots >= 0
    if not bool(keep.any()):
        return
    lat, rope, slots = latent[keep], k_rope[keep], slots[keep]
    flat = kv_cache.view(num_pages * page_size, kv_cache.shape[-1])
    if is_fp8_cache(kv_cache):
        flat[slots] = quantize_tokens(lat, rope)
    else:
        flat[slots] = torch.cat([lat.float(), rope.float()], dim=-1).to(kv_cache.dtype)


# ---------------------------------------------------------------------------------------------
# Pre-attention glue: kv_a RMSNorm, rope, cache append
# ---------------------------------------------------------------------------------------------
def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3's rotary embedding of adjacent pairs (x[2i], x[2i+1]) by cos/sin[..., i].

    x [T, ..., dim] with cos/sin [T, dim/2] (broadcast over the middle dims); computed in fp32 as
    (x0 * c - x1 * s, x0 * s + x1 * c), each product and sum rounded to fp32, returned in x's dtype.
    """
    xf = x.float()
    x0, x1 = xf[..., 0::2], xf[..., 1::2]
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
    c, s = cos.view(shape), sin.view(shape)
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


def check_positions(positions: torch.Tensor, num_positions: int) -> None:
    pos = positions.long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= num_positions):
        raise ValueError(f"flashseek: positions must lie in [0, {num_positions}) (the rope tables' rows), "
                         f"got [{int(pos.min())}, {int(pos.max())}]")


def mla_rope_norm_append(kv: torch.Tensor, q_pe: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                         sin: torch.Tensor, norm_weight: torch.Tensor, eps: float, slot_mapping: torch.Tensor,
                         kv_cache: torch.Tensor) -> torch.Tensor:
    """The MLA layer's glue between the kv_a projection and attention; returns rope(q_pe).

    kv [T, 576] (512 latent | 64 k_pe) and q_pe [T, h, 64] in bf16/fp16; cos/sin [P, 32] fp32 tables
    read at positions [T]. Exactly the unfused sequence
        latent = rms_norm(kv[:, :512], norm_weight, eps)            (in kv's dtype)
        k_pe   = rope_interleaved(kv[:, 512:], cos[pos], sin[pos])  (fp32, rounded to kv's dtype)
        mla_cache_append(latent, k_pe, kv_cache, slot_mapping)      (negative slots skipped)
        return rope_interleaved(q_pe, cos[pos], sin[pos])
    """
    check_positions(positions, cos.shape[0])
    pos = positions.long()
    c, s = cos[pos], sin[pos]
    latent = rms_norm(kv[:, :D_V], norm_weight, eps)
    k_pe = rope_interleaved(kv[:, D_V:], c, s)
    mla_cache_append(latent, k_pe, kv_cache, slot_mapping)
    return rope_interleaved(q_pe, c, s)


# ---------------------------------------------------------------------------------------------
# Decode
# ---------------------------------------------------------------------------------------------
def check_indices(kv_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor) -> None:
    """Value checks (they read the tensors; the CUDA kernel instead clamps, see mla_ops.cpp)."""
    num_pages, page_size = kv_cache.shape[:2]
    cap = block_table.shape[1] * page_size
    lens = cache_seqlens.long().cpu()
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > cap):
        raise ValueError(f"flashseek: cache_seqlens must lie in [0, block_table capacity "
                         f"{block_table.shape[1]} pages * {page_size} = {cap}], got "
                         f"[{int(lens.min())}, {int(lens.max())}]")
    used = (lens + page_size - 1) // page_size
    bt = block_table.long().cpu()
    mask = torch.arange(bt.shape[1]).unsqueeze(0) < used.unsqueeze(1)
    vals = bt[mask]
    if vals.numel() and (int(vals.min()) < 0 or int(vals.max()) >= num_pages):
        raise ValueError(f"flashseek: block_table entries in use must lie in [0, num_pages = "
                         f"{num_pages}), got [{int(vals.min())}, {int(vals.max())}]")


def mla_decode(q: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
               cache_seqlens: torch.Tensor, softmax_scale: float, causal: bool):
    """Returns (out fp32 [b, s_q, h_q, 512], lse fp32 [b, h_q, s_q]) computed in fp32."""
    check_indices(kv_cache, block_table, cache_seqlens)
    b, s_q, h_q, _ = q.shape
    page_size = kv_cache.shape[1]
    out = torch.zeros((b, s_q, h_q, D_V), dtype=torch.float32, device=q.device)
    lse = torch.full((b, h_q, s_q), float("-inf"), dtype=torch.float32, device=q.device)
    lens = cache_seqlens.long().cpu().tolist()
    for i, n in enumerate(lens):
        if n == 0:
            continue
        pages = block_table[i, : (n + page_size - 1) // page_size].long()
        kv = cache_as_float(kv_cache[pages]).reshape(-1, D_QK)[:n]          # [n, 576]
        qi = q[i].float().reshape(s_q * h_q, D_QK)                          # rows s * h_q + h
        s = (qi @ kv.t()) * softmax_scale                                   # [s_q*h_q, n]
        if causal:
            visible = n - s_q + torch.arange(s_q, device=q.device) + 1      # per query index
            limit = visible.repeat_interleave(h_q).unsqueeze(1)
            s = s.masked_fill(torch.arange(n, device=q.device).unsqueeze(0) >= limit, float("-inf"))
        row_lse = torch.logsumexp(s, dim=-1)                                # -inf where nothing seen
        seen = torch.isfinite(row_lse)
        p = torch.where(seen.unsqueeze(1), torch.exp(s - row_lse.unsqueeze(1)), torch.zeros_like(s))
        o = p @ kv[:, :D_V]
        out[i] = o.reshape(s_q, h_q, D_V)
        lse[i] = row_lse.reshape(s_q, h_q).t()
    return out, lse


def default_softmax_scale() -> float:
    """DeepSeek-V3's scale for the 192-dim (nope 128 + rope 64) head, without YaRN mscale."""
    return 1.0 / math.sqrt(192)
