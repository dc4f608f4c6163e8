"""MoE dispatch / combine references and the reference MoE layer (the specification of fused_moe).

Dispatch: the T * topk (token, k) slots are numbered s = t * topk + k. Slots are grouped by local
expert (expert_map: global id -> local id, -1 = held elsewhere, dropped), ascending slot id within
each expert.
  * contiguous layout (prefill): expert e owns rows [offsets[e], offsets[e+1]), its count padded up
    to a multiple of block_m; sorted_ids[row] = slot, or the sentinel T * topk for padding and the
    unused tail; block_expert_ids[b] = the expert of rows [b * block_m, (b+1) * block_m) or -1.
  * masked layout (decode): slot -> row e * max_m + rank in an [E_local, max_m, ...] buffer,
    masked_m[e] = min(count, max_m) (a token's ids are distinct, so max_m = T never overflows).
  * token_slots [T, topk] = the row of each slot (-1 if dropped): what combine reads.
Combine: out[t] = bf16(sum_j w[t, j] * y[token_slots[t, j]] + shared[t]), fp32, j ascending, each
term a separately rounded multiply then add (the CUDA kernel's exact arithmetic).
"""
from __future__ import annotations

from typing import Optional

import torch

from flashseek.ref import quant as ref_quant
from flashseek.ref import routing as ref_routing


def moe_align_max_rows(n_slots: int, num_local: int, block_m: int) -> int:
    """Static bound on the contiguous layout's rows: every non-empty expert pads < block_m rows."""
    rows = n_slots + min(num_local, n_slots) * (block_m - 1)
    return (rows + block_m - 1) // block_m * block_m


def _local_ids(topk_ids: torch.Tensor, num_experts: int, expert_map: Optional[torch.Tensor], num_local: int):
    flat = topk_ids.reshape(-1).long()
    if flat.numel():
        lo, hi = int(flat.min()), int(flat.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"flashseek: topk_ids must lie in [0, num_experts={num_experts}), "
                             f"got values in [{lo}, {hi}]")
    if expert_map is None:
        return flat
    em = expert_map.long()
    if em.numel():
        lo, hi = int(em.min()), int(em.max())
        if lo < -1 or hi >= num_local:
            raise ValueError(f"flashseek: expert_map values must lie in [-1, {num_local}) (local expert ids or -1), "
                             f"got values in [{lo}, {hi}]")
    return em[flat]


def _ranks(local: torch.Tensor, num_local: int):
    """(counts [E], rank of each slot within its expert in ascending slot order; -1 if dropped)."""
    n = local.numel()
    valid = local >= 0
    key = torch.where(valid, local, torch.full_like(local, num_local))
    order = torch.sort(key, stable=True)[1]
    counts = torch.bincount(key, minlength=num_local + 1)[:num_local]
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.full((n,), -1, dtype=torch.long, device=local.device)
    sorted_key = key[order]
    pos = torch.arange(n, device=local.device)
    sorted_valid = sorted_key < num_local
    within = pos - starts[sorted_key.clamp(max=num_local - 1)]
    rank[order[sorted_valid]] = within[sorted_valid]
    return counts, rank


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: Optional[torch.Tensor],
              num_local: int, max_rows: int):
    """-> (sorted_ids int32 [max_rows], block_expert_ids int32 [max_rows / block_m],
    expert_offsets int32 [num_local + 1], token_slots int32 [T, topk])."""
    dev = topk_ids.device
    n = topk_ids.numel()
    local = _local_ids(topk_ids, num_experts, expert_map, num_local)
    counts, rank = _ranks(local, num_local)
    padded = (counts + block_m - 1) // block_m * block_m
    offsets = torch.zeros(num_local + 1, dtype=torch.long, device=dev)
    offsets[1:] = torch.cumsum(padded, 0)
    valid = rank >= 0
    row = torch.full((n,), -1, dtype=torch.long, device=dev)
    row[valid] = offsets[local[valid]] + rank[valid]
    sorted_ids = torch.full((max_rows,), n, dtype=torch.int32, device=dev)
    sorted_ids[row[valid]] = torch.arange(n, device=dev)[valid].to(torch.int32)
    block_start = torch.arange(max_rows // block_m, device=dev) * block_m
    bexp = torch.searchsorted(offsets, block_start, right=True) - 1
    bexp = torch.where(block_start < offsets[-1], bexp, torch.full_like(bexp, -1))
    return (sorted_ids, bexp.to(torch.int32), offsets.to(torch.int32),
            row.to(torch.int32).reshape(topk_ids.shape))


def moe_align_masked(topk_ids: torch.Tensor, num_experts: int, max_m: int, expert_map: Optional[torch.Tensor],
                     num_local: int):
    """-> (masked_m int32 [num_local], token_slots int32 [T, topk]); ranks >= max_m are dropped."""
    local = _local_ids(topk_ids, num_experts, expert_map, num_local)
    counts, rank = _ranks(local, num_local)
    ok = (rank >= 0) & (rank < max_m)
    row = torch.where(ok, local * max_m + rank, torch.full_like(rank, -1))
    return counts.clamp(max=max_m).to(torch.int32), row.to(torch.int32).reshape(topk_ids.shape)


def gather_quant(hidden: torch.Tensor, sorted_ids: torch.Tensor, topk: int, ue8m0: bool = False):
    """Row r = quant_fp8_1x128(hidden[sorted_ids[r] // topk], ue8m0); ids outside [0, T * topk) (the
    sentinel) give the quantization of a zero row: q = 0, scale = 1e-4 / 448 (ue8m0: 2^-22)."""
    t = hidden.shape[0]
    ids = sorted_ids.long()
    real = (ids >= 0) & (ids < t * topk)
    src = torch.zeros((ids.numel(), hidden.shape[1]), dtype=hidden.dtype, device=hidden.device)
    src[real] = hidden[ids[real] // topk]
    return ref_quant.quant_fp8_1x128(src, ue8m0)


def scatter_quant_(hidden: torch.Tensor, token_slots: torch.Tensor, out: torch.Tensor, scale: torch.Tensor,
                   ue8m0: bool = False):
    """out / scale viewed as [G, M, H] / [G, M, H/128]: row token_slots[t, j] (flat row index
    g * M + m) = quant_fp8_1x128(hidden[t], ue8m0); slots < 0 skipped, other rows untouched."""
    if hidden.shape[0] == 0:
        return
    q, s = ref_quant.quant_fp8_1x128(hidden, ue8m0)
    g, m = out.shape[0], out.shape[1]
    slots = token_slots.long()
    if slots.numel():
        hi = int(slots.max())
        if hi >= g * m:
            raise ValueError(f"flashseek: token_slots must be < the {g * m} rows of out, got {hi}")
    tok = torch.arange(hidden.shape[0], device=hidden.device).unsqueeze(1).expand_as(slots)
    ok = slots >= 0
    rows, src = slots[ok], tok[ok]
    # Through uint8 views: index_put on float8 tensors is not implemented on every backend.
    out.view(torch.uint8)[rows // m, rows % m] = q.view(torch.uint8)[src]
    scale[rows // m, rows % m] = s[src]


def shared_expert_rows(t: int, num_local: int, num_shared: int, max_m: int, device) -> torch.Tensor:
    """int32 [T, num_shared]: the masked layout's row of token t in shared expert j, which follows the
    num_local routed experts and takes every token at its own row: (num_local + j) * max_m + t."""
    return ((torch.arange(num_shared, device=device)[None, :] + num_local) * max_m +
            torch.arange(t, device=device)[:, None]).to(torch.int32)


def route_dispatch_(hidden: torch.Tensor, logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int,
                    topk: int, routed_scaling_factor: float, renormalize: bool, expert_map: Optional[torch.Tensor],
                    a: torch.Tensor, a_scale: torch.Tensor, num_shared: int = 0, ue8m0: bool = False):
    """The front of fused_moe's masked path, the specification of moe_route_dispatch: route_noaux_tc,
    then moe_align_masked (num_local = a.shape[0] - num_shared, max_m = a.shape[1]), then scatter_quant_
    (with ue8m0) into a / a_scale [E_local + num_shared, max_m, H(/128)] (rows no slot points at untouched). The
    num_shared experts after the routed ones take every token t at row t (max_m >= T): masked_m = T.
    -> (topk_weights, topk_ids, masked_m, token_slots)."""
    t = hidden.shape[0]
    num_local, max_m = a.shape[0] - num_shared, a.shape[1]
    w, ids = ref_routing.route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize)
    masked_m, slots = moe_align_masked(ids, logits.shape[1], max_m, expert_map, num_local)
    # One scatter over the routed slots plus a slot per (token, shared expert): every row comes from
    # the token's one quantization, as in the kernel.
    shared = shared_expert_rows(t, num_local, num_shared, max_m, slots.device)
    scatter_quant_(hidden, torch.cat([slots, shared], 1), a, a_scale, ue8m0)
    masked_m = torch.cat([masked_m, masked_m.new_full((num_shared,), t)])
    return w, ids, masked_m, slots


def combine(expert_out: torch.Tensor, topk_weights: torch.Tensor, token_slots: torch.Tensor,
            shared_out: Optional[torch.Tensor]) -> torch.Tensor:
    """expert_out [R, H] -> out bf16 [T, H], the exact arithmetic of the CUDA kernel."""
    t, k = token_slots.shape
    h = expert_out.shape[1]
    acc = torch.zeros((t, h), dtype=torch.float32, device=expert_out.device)
    slots = token_slots.long()
    if slots.numel():
        hi = int(slots.max())
        if hi >= expert_out.shape[0]:
            raise ValueError(f"flashseek: token_slots must be < the {expert_out.shape[0]} rows of expert_out, got {hi}")
    for j in range(k):
        ok = slots[:, j] >= 0
        rows = expert_out[slots[:, j].clamp(min=0)].float()
        term = topk_weights[:, j:j + 1].float() * rows
        acc = torch.where(ok.unsqueeze(1), acc + term, acc)
    if shared_out is not None:
        acc = acc + shared_out.float()
    return acc.to(torch.bfloat16)


def _dequant_weight(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """w e4m3 [N, K], s fp32 [ceil(N/128), K/128] -> fp32 [N, K]."""
    n, k = w.shape
    full = s.repeat_interleave(128, dim=0)[:n].repeat_interleave(128, dim=1)[:, :k]
    return w.float() * full


def expert_mlp(x_q: torch.Tensor, x_s: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
               w2_scale: torch.Tensor, ue8m0: bool = False) -> torch.Tensor:
    """One expert on already-quantized rows: the pipeline's rounding points (bf16 GEMM outputs, the
    fused silu*up quantization, with ue8m0 scales if asked), dequantized fp32 GEMMs in between.
    -> bf16 [M, H]."""
    a = ref_quant.dequant_fp8_1x128(x_q, x_s)
    gu = (a @ _dequant_weight(w13, w13_scale).t()).to(torch.bfloat16)
    h_q, h_s = ref_quant.silu_mul_quant_fp8(gu, ue8m0)
    h = ref_quant.dequant_fp8_1x128(h_q, h_s)
    return (h @ _dequant_weight(w2, w2_scale).t()).to(torch.bfloat16)


def moe_experts(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, w13, w13_scale, w2,
                w2_scale, expert_map: Optional[torch.Tensor] = None,
                shared_out: Optional[torch.Tensor] = None, ue8m0: bool = False) -> torch.Tensor:
    """Reference routed MoE from given routing: per expert, quantize its tokens (1x128; ue8m0: power-of-two
    scales, both quantizations), run the dequantized FP8 MLP, combine in fp32 (j ascending) and add
    shared_out. -> bf16 [T, H]."""
    t, h = hidden.shape
    k = topk_ids.shape[1]
    num_local = w13.shape[0]
    num_global = expert_map.numel() if expert_map is not None else num_local
    local = _local_ids(topk_ids, num_global, expert_map, num_local).reshape(t, k)
    y = torch.zeros((t, k, h), dtype=torch.bfloat16, device=hidden.device)
    x_q, x_s = ref_quant.quant_fp8_1x128(hidden, ue8m0) if t else (None, None)
    for e in torch.unique(local[local >= 0]).tolist():
        tok, j = torch.nonzero(local == e, as_tuple=True)
        xq = x_q.view(torch.uint8)[tok].view(torch.float8_e4m3fn)  # fp8 gathers are not on every backend
        y[tok, j] = expert_mlp(xq, x_s[tok], w13[e], w13_scale[e], w2[e], w2_scale[e], ue8m0)
    slots = torch.where(local >= 0, torch.arange(t * k, device=hidden.device).reshape(t, k),
                        torch.full_like(local, -1)).to(torch.int32)
    return combine(y.reshape(t * k, h), topk_weights, slots, shared_out)


def route(router_logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize, scoring):
    if scoring == "sigmoid":
        if bias is None:
            bias = torch.zeros(router_logits.shape[1], dtype=torch.float32, device=router_logits.device)
        return ref_routing.route_noaux_tc(router_logits, bias, n_group, topk_group, topk, routed_scaling_factor,
                                          renormalize)
    if scoring == "softmax":
        w, ids = ref_routing.route_softmax_topk(router_logits, topk, renormalize)
        return w * routed_scaling_factor, ids
    raise ValueError(f"flashseek: scoring must be 'sigmoid' or 'softmax', got {scoring!r}")


def fused_moe(hidden, router_logits, bias, w13, w13_scale, w2, w2_scale, *, n_group, topk_group, topk,
              routed_scaling_factor, renormalize=True, scoring="sigmoid", shared_out=None, expert_map=None,
              n_shared_experts=0, ue8m0=False):
    """The specification of flashseek.ops.fused_moe: route, then moe_experts. With n_shared_experts = 1
    the last expert of the stacks is the shared expert: its MLP on every token (the same 1x128
    quantization of hidden and the same rounding points as a routed expert) is shared_out. ue8m0: every
    activation quantization (hidden's, silu*up's) rounds its scales up to powers of two."""
    if n_shared_experts:
        e = w13.shape[0] - 1
        if hidden.shape[0]:
            x_q, x_s = ref_quant.quant_fp8_1x128(hidden, ue8m0)
            shared_out = expert_mlp(x_q, x_s, w13[e], w13_scale[e], w2[e], w2_scale[e], ue8m0)
        w13, w13_scale, w2, w2_scale = w13[:e], w13_scale[:e], w2[:e], w2_scale[:e]
    w, ids = route(router_logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize, scoring)
    return moe_experts(hidden, w, ids, w13, w13_scale, w2, w2_scale, expert_map, shared_out, ue8m0)
