"""Paged MLA latent decode: reference semantics (CPU, against float64) and CUDA kernels vs reference.

Set FLASHSEEK_MLA_REDUCED=1 to shrink the CUDA sweep (for runs under compute-sanitizer memcheck).
"""
import math
import os
import random

import pytest
import torch

from flashseek import ops
from flashseek.ref import mla as ref_mla
from tests.utils import cos_diff, opcheck, poison_

REDUCED = os.environ.get("FLASHSEEK_MLA_REDUCED", "0") == "1"
SCALE = 1.0 / math.sqrt(192)


# ----------------------------------------------------------------------------------- inputs
def make_case(b, s_q, h_q, lens, page_size, fp8=False, qdtype=torch.bfloat16, device="cpu",
              nan_fill=True, spare_pages=3, gen_seed=0):
    """Random q and a paged cache holding `lens[i]` random tokens per request, built on `device`.

    Pages are handed out in a random permutation; every unused page, unused slot and unused table
    entry holds garbage (NaN in the cache, a huge page id in the table) that must never be read.
    """
    g = torch.Generator(device=device).manual_seed(gen_seed)
    lens = [int(x) for x in lens]
    need = [(n + page_size - 1) // page_size for n in lens]
    max_pages = max(max(need), 1) + 1
    num_pages = sum(need) + spare_pages
    perm = torch.randperm(num_pages, generator=g, device=device).int()
    starts = torch.tensor([0] + need, device=device).cumsum(0)[:-1]
    col = torch.arange(max_pages, device=device)
    used = col[None, :] < torch.tensor(need, device=device)[:, None]
    idx = (starts[:, None] + col[None, :]).clamp(max=num_pages - 1)
    table = torch.where(used, perm[idx], torch.full_like(perm[idx], 1 << 30)).int()
    width = ref_mla.FP8_TOKEN_BYTES if fp8 else ref_mla.D_QK
    cache = torch.empty((num_pages, page_size, width), dtype=torch.uint8 if fp8 else torch.bfloat16,
                        device=device)
    cache.view(torch.uint8).fill_(0xFF if nan_fill else 0)  # 0xFF: NaN as bf16, e4m3 and fp32 scales
    total = sum(lens)
    latent = torch.randn(total, ref_mla.D_V, generator=g, device=device).bfloat16()
    rope = torch.randn(total, ref_mla.D_ROPE, generator=g, device=device).bfloat16()
    req = torch.repeat_interleave(torch.arange(b, device=device), torch.tensor(lens, device=device))
    tok = torch.arange(total, device=device) - torch.tensor([0] + lens, device=device).cumsum(0)[:-1][req]
    slots = table[req, tok // page_size].long() * page_size + tok % page_size
    if total:
        ref_mla.mla_cache_append(latent, rope, cache, slots)
    q = torch.randn(b, s_q, h_q, ref_mla.D_QK, generator=g, device=device).to(qdtype)
    return dict(q=q, kv_cache=cache, block_table=table, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                device=device), latent=latent, rope=rope, slots=slots, lens=lens)


def direct_f64(case, causal, scale=SCALE):
    """Attention computed token by token from the cache contents in float64 (independent of ref_mla)."""
    q, cache, table = case["q"].cpu(), case["kv_cache"].cpu(), case["block_table"].cpu()
    b, s_q, h_q, _ = q.shape
    ps = cache.shape[1]
    out = torch.zeros(b, s_q, h_q, ref_mla.D_V, dtype=torch.float64)
    lse = torch.full((b, h_q, s_q), -math.inf, dtype=torch.float64)
    for i, n in enumerate(case["lens"]):
        if n == 0:
            continue
        rows = []
        for t in range(n):
            tok = cache[table[i, t // ps], t % ps]
            if cache.dtype == torch.uint8:
                lat = tok[:512].view(torch.float8_e4m3fn).double().reshape(4, 128)
                sc = tok[512:528].view(torch.float32).double()
                rows.append(torch.cat([(lat * sc[:, None]).reshape(512), tok[528:].view(torch.bfloat16).double()]))
            else:
                rows.append(tok.double())
        k = torch.stack(rows)
        for s in range(s_q):
            vis = n - s_q + s + 1 if causal else n
            if vis <= 0:
                continue
            sc = q[i, s].double() @ k[:vis].t() * scale  # [h_q, vis]
            m = sc.max(dim=-1, keepdim=True).values
            e = torch.exp(sc - m)
            out[i, s] = (e @ k[:vis, :512]) / e.sum(-1, keepdim=True)
            lse[i, :, s] = (m + torch.log(e.sum(-1, keepdim=True))).squeeze(-1)
    return out, lse


def run_op(case, causal, num_sm_parts=None, out=None, lse=None, scale=SCALE):
    plan = ops.mla_decode_plan(case["cache_seqlens"], case["q"].shape[1], case["q"].shape[2], num_sm_parts)
    return ops.mla_decode(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], plan,
                          scale, causal, out=out, lse=lse)


def assert_lse_close(lse, ref_lse, atol):
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), "rows that see no key must have lse = -inf, and only those"
    assert torch.all(lse[~fin] == -math.inf)
    if fin.any():
        assert (lse[fin].double() - ref_lse[fin].double()).abs().max() < atol


# ------------------------------------------------------------------------------ CPU: reference
@pytest.mark.parametrize("page_size", ref_mla.PAGE_SIZES)
@pytest.mark.parametrize("s_q,h_q,causal", [(1, 1, False), (1, 3, True), (2, 5, True), (3, 2, False), (4, 3, True)])
@pytest.mark.parametrize("fp8", [False, True])
def test_reference_matches_float64(page_size, s_q, h_q, causal, fp8):
    # Lengths: empty, shorter than s_q (causal rows that see nothing), within a page, several pages.
    lens = [0, 2, 37, 3 * page_size + 5, 1]
    case = make_case(len(lens), s_q, h_q, lens, page_size, fp8=fp8, gen_seed=page_size + s_q)
    out, lse = ref_mla.mla_decode(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                  SCALE, causal)
    d_out, d_lse = direct_f64(case, causal)
    # fp32 math on exact (bf16 / dequantized) inputs: errors of a few fp32 ulps of the scores.
    assert torch.allclose(out.double(), d_out, atol=2e-5, rtol=1e-4)
    assert_lse_close(lse, d_lse, 1e-4)
    assert torch.all(out[0] == 0) and torch.all(lse[0] == -math.inf)


@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16])
def test_decode_op_cpu_writes_outputs(qdtype):
    case = make_case(3, 2, 4, [5, 0, 70], 16, qdtype=qdtype)
    out = poison_(torch.empty(3, 2, 4, 512, dtype=qdtype))
    lse = poison_(torch.empty(3, 4, 2))
    o, l = run_op(case, True, out=out, lse=lse)
    assert o is out and l is lse and o.dtype == qdtype
    r_out, r_lse = ref_mla.mla_decode(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                      SCALE, True)
    assert torch.equal(out, r_out.to(qdtype)) and torch.equal(lse, r_lse)


def test_fp8_cache_roundtrip_accuracy():
    x = torch.randn(300, 512) * torch.logspace(-3, 2, 300)[:, None]
    x[0] = 0  # an all-zero token hits the scale floor
    rope = torch.randn(300, 64).bfloat16()
    raw = ref_mla.quantize_tokens(x.bfloat16(), rope)
    assert raw.shape == (300, 656) and raw.dtype == torch.uint8
    deq = ref_mla.dequantize_tokens(raw)
    xb = x.bfloat16().float().reshape(300, 4, 128)
    s = raw[:, 512:528].contiguous().view(torch.float32)
    assert torch.equal(s, xb.abs().amax(-1).clamp(min=1e-4) / 448)
    # e4m3 keeps 3 mantissa bits: error <= 1/16 of the value, or 2^-9 scale units near zero.
    tol = xb.abs() / 16 + s[..., None] * 2**-9 * 1.01
    assert torch.all((deq[:, :512].reshape(300, 4, 128) - xb).abs() <= tol)
    assert torch.equal(deq[:, 512:], rope.float())  # rope stays bf16, exactly
    assert cos_diff(deq[:, :512], xb.reshape(300, 512)) < 2e-3


def test_fp8_cache_decode_error_vs_bf16_cache():
    # End-to-end cost of the FP8 cache itself (quantization, not the kernel): informational budget.
    lens = [300, 1000]
    a = make_case(2, 1, 16, lens, 64, fp8=False, gen_seed=5)
    b = make_case(2, 1, 16, lens, 64, fp8=True, gen_seed=5)
    oa, _ = ref_mla.mla_decode(a["q"], a["kv_cache"], a["block_table"], a["cache_seqlens"], SCALE, False)
    ob, _ = ref_mla.mla_decode(b["q"], b["kv_cache"], b["block_table"], b["cache_seqlens"], SCALE, False)
    assert cos_diff(oa, ob) < 5e-3


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cache_append_reference(fp8, dtype):
    cache = ops.empty_mla_cache(4, 16, fp8=fp8, device="cpu")
    cache.view(torch.uint8).fill_(0xFF)
    kv = torch.randn(5, 576).to(dtype)
    latent, rope = kv[:, :512], kv[:, 512:]  # strided views, as sliced from kv_a_proj's output
    slots = torch.tensor([3, -1, 17, 63, 40], dtype=torch.int64)
    ops.mla_cache_append(latent, rope, cache, slots)
    flat = ref_mla.cache_as_float(cache).reshape(64, 576)
    for j, s in enumerate(slots.tolist()):
        if s < 0:
            continue
        want = kv[j].float()
        if fp8:
            assert torch.equal(flat[s, 512:], want[512:].bfloat16().float())
            assert cos_diff(flat[s, :512], want[:512]) < 2e-3
        else:
            assert torch.equal(flat[s], want.bfloat16().float())
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[slots[slots >= 0]] = False
    assert torch.all(cache.view(torch.uint8).reshape(64, -1)[untouched] == 0xFF)


def _check_plan_covers(plan, lens, P):
    """Every key block of every request is covered once, split ordinals are 0..n-1 in order, each
    request has >= 1 piece, and multi-split requests own disjoint workspace slots below 2P."""
    plan = plan.cpu().tolist()
    b = len(lens)
    assert len(plan) == 8 * P + 2 * b
    nblk = [(n + 63) // 64 for n in lens]
    pieces = {i: [] for i in range(b)}
    for p in range(P):
        b0, blk0, b1, blk1, split0 = plan[8 * p: 8 * p + 5]
        for i in range(b0, b1 + 1):
            beg = blk0 if i == b0 else 0
            end = blk1 if i == b1 else nblk[i]
            pieces[i].append((beg, end, split0 if i == b0 else 0))
    used = set()
    for i in range(b):
        base, n = plan[8 * P + 2 * i: 8 * P + 2 * i + 2]
        ps = sorted(pieces[i])
        assert len(ps) == n >= 1
        assert [x[2] for x in ps] == list(range(n))
        assert ps[0][0] == 0 and ps[-1][1] == nblk[i]
        assert all(ps[k][1] == ps[k + 1][0] for k in range(n - 1))
        assert all(x[1] > x[0] for x in ps) or nblk[i] == 0
        if n > 1:
            slots = set(range(base, base + n))
            assert not (slots & used) and max(slots) < 2 * P
            used |= slots


@pytest.mark.parametrize("P", [1, 2, 7, 66, 132])
def test_plan_reference_schedule(P):
    rng = random.Random(P)
    for lens in ([0], [5], [160 * 1024], [0, 0, 3], [rng.randint(0, 20000) for _ in range(37)],
                 [4096] * 128, [rng.choice([0, 1, 64, 65, 9000]) for _ in range(300)]):
        plan = ops.mla_decode_plan(torch.tensor(lens, dtype=torch.int32), 1, 16, P)
        assert plan.dtype == torch.int32
        _check_plan_covers(plan, lens, P)


RESCALE_SLACK = 8.0  # log2 units: the 64-row kernels' wg::kRescaleSlack


def emulate_kernel(case, plan, causal, scale=SCALE, cluster_pairs=False):
    """The CUDA kernel's algorithm in torch: each sm part walks its pieces in 64-key blocks with the
    online softmax in the log2 domain and P rounded to bf16, writes one-split requests directly and
    split partials (o / l, log2 lse) to workspace slots, then the combine merges them. With
    cluster_pairs (the decode launched in 2-CTA clusters), the pair of parts (2c, 2c + 1) merges the
    request they alone hold, and the combine skips it. It pins down the contract between the plan and
    the kernels (piece bounds, split slots, who merges what, masking, clamping)."""
    q, cache, table, lens = case["q"], case["kv_cache"], case["block_table"], case["lens"]
    b, s_q, h_q, _ = q.shape
    rows, ps = s_q * h_q, cache.shape[1]
    P = ref_mla.plan_num_sm_parts(plan.numel(), b)
    plan = plan.tolist()
    per_req = plan[8 * P:]
    kvf = ref_mla.cache_as_float(cache).reshape(-1, 576)
    cap = table.shape[1] * ps
    out = torch.full((b, rows, 512), math.nan)
    lse = torch.full((b, rows), math.nan)
    ws = {}
    log2e = 1.0 / math.log(2.0)
    for part in range(P):
        b0, blk0, b1, blk1, split0 = plan[8 * part: 8 * part + 5]
        for bi in range(max(b0, 0), min(b1, b - 1) + 1):
            n = max(lens[bi], 0)
            n_eff = min(n, cap)
            nblk = (n + 63) // 64
            beg = max(blk0, 0) if bi == b0 else 0
            end = min(blk1, nblk) if bi == b1 else nblk
            qr = q[bi].reshape(rows, 576).bfloat16().float()
            s_idx = torch.arange(rows) // h_q
            limit = ((n - s_q + s_idx + 1) if causal else torch.full((rows,), n)).clamp(max=n_eff)
            m = torch.full((rows,), -math.inf)
            l = torch.zeros(rows)
            o = torch.zeros(rows, 512)
            for blk in range(beg, end):
                keys = torch.arange(blk * 64, blk * 64 + 64)
                k = torch.zeros(64, 576)
                ok = keys < n_eff
                pages = table[bi, keys[ok] // ps].long().clamp(0, cache.shape[0] - 1)
                k[ok] = kvf[pages * ps + keys[ok] % ps]
                s = (qr @ k.t()) * (scale * log2e)
                s = s.masked_fill(keys[None, :] >= limit[:, None], -math.inf)
                # Lazy rescaling (wg::lazy_max): the reference max moves only past RESCALE_SLACK.
                blk_max = s.max(dim=1).values
                m_new = torch.where(blk_max > m + RESCALE_SLACK, blk_max, m)
                m_use = torch.where(m_new == -math.inf, torch.zeros_like(m_new), m_new)
                alpha = torch.where(m_new == m, torch.ones_like(m), torch.exp2(m - m_use))
                p = torch.exp2(s - m_use[:, None])
                l = l * alpha + p.sum(1)
                o = o * alpha[:, None] + p.bfloat16().float() @ k[:, :512]
                m = m_new
            seen = l > 0
            o_n = torch.where(seen[:, None], o / l.clamp(min=1e-30)[:, None], torch.zeros_like(o))
            lse2 = torch.where(seen, m + torch.log2(l.clamp(min=1e-30)), torch.full_like(m, -math.inf))
            if per_req[2 * bi + 1] <= 1:
                assert torch.isnan(lse[bi]).all(), "a request written twice"
                out[bi], lse[bi] = o_n, lse2 / log2e
            else:
                slot = per_req[2 * bi] + (split0 if bi == b0 else 0)
                assert 0 <= slot < 2 * P and slot not in ws, "split slots must be distinct and in range"
                ws[slot] = (o_n, lse2)
    def merge(bi, base, nsplit):
        os_ = torch.stack([ws[base + i][0] for i in range(nsplit)])
        ls = torch.stack([ws[base + i][1] for i in range(nsplit)])
        mx = ls.max(0).values
        tot = torch.where(mx == -math.inf, mx, mx + torch.log2(torch.exp2(ls - mx).sum(0)))
        w = torch.where(tot == -math.inf, torch.zeros_like(ls), torch.exp2(ls - tot))
        assert torch.isnan(lse[bi]).all(), "a request merged twice"
        out[bi] = (w[..., None] * os_).sum(0)
        lse[bi] = tot / log2e

    # Cluster pairs: merged by the two CTAs that computed them, from their own (per-request) entries.
    if cluster_pairs:
        nsplits = per_req[1::2]
        for c in range(0, P - 1, 2):
            r = ref_mla.cluster_pair_request(plan, c, P, nsplits)
            if r >= 0:
                merge(r, per_req[2 * r], 2)
    # The combine's grid: one row of CTAs per entry of the plan's split list that any plan can hold.
    for e in range(min(b, P - 1)):
        bi, base, nsplit = plan[8 * e + 5: 8 * e + 8]
        if nsplit < 0 and cluster_pairs:
            continue
        if bi >= 0 and abs(nsplit) > 1:
            merge(bi, base, abs(nsplit))
    assert not torch.isnan(lse).any(), "a request was never written"
    return out.reshape(b, s_q, h_q, 512), lse.reshape(b, s_q, h_q).transpose(1, 2)


@pytest.mark.parametrize("P,lens", [(1, None), (2, None), (5, None), (40, None), (8, [256] * 4),
                                    (12, [128, 300, 128, 0, 65, 200, 7])])
@pytest.mark.parametrize("s_q,h_q,causal", [(1, 16, False), (2, 3, True), (4, 5, True)])
@pytest.mark.parametrize("cluster_pairs", [False, True])
def test_kernel_schedule_emulation(P, lens, s_q, h_q, causal, cluster_pairs):
    lens = lens or [0, 1, 64, 65, 700, 3, 129, 0, 260]
    case = make_case(len(lens), s_q, h_q, lens, 32, gen_seed=P)
    plan = ops.mla_decode_plan(case["cache_seqlens"], s_q, h_q, P)
    if lens == [256] * 4:  # four-block requests on 8 parts: every request is a cluster pair
        assert [plan[8 * e + 7].item() for e in range(4)] == [-2] * 4
    out, lse = emulate_kernel(case, plan, causal, cluster_pairs=cluster_pairs)
    r_out, r_lse = ref_mla.mla_decode(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                      SCALE, causal)
    # bf16 P is the only approximation (the output stays fp32 here).
    assert_bf16_budget(out, r_out, softmax_abs_v(case, causal), torch.float32)
    assert_lse_close(lse, r_lse, 1e-4)


def test_plan_balances_parts():
    lens = [4096] * 128
    P = 66
    plan = ref_mla.mla_decode_plan(torch.tensor(lens, dtype=torch.int32), 1, 128, P).tolist()
    costs = []
    for p in range(P):
        b0, blk0, b1, blk1, _ = plan[8 * p: 8 * p + 5]
        c = 0
        for i in range(b0, b1 + 1):
            c += (blk1 if i == b1 else 64) - (blk0 if i == b0 else 0) + ref_mla.FIXED_SPLIT_COST
        costs.append(c)
    assert max(costs) <= (sum(costs) + P - 1) // P + 2 * ref_mla.FIXED_SPLIT_COST


def test_plan_payload_is_the_smallest_that_fits():
    # Brute force over every payload from the smallest allowed: none below plan_payload's fits in P parts.
    rng = random.Random(17)
    cases = [([4096] * 2, 66), ([4096] * 3, 66), ([1024] * 32, 66), ([4096] * 16, 66), ([4096] * 4, 132),
             ([0, 0, 3], 7), ([160 * 1024], 66), ([4096] * 128, 66)]
    cases += [([rng.choice([0, 1, 64, 65, 300, 4096, 9000]) for _ in range(rng.randint(1, 40))], rng.choice([1, 2, 7, 66]))
              for _ in range(60)]
    for lens, P in cases:
        nblk = [(n + 63) // 64 for n in lens]
        payload = ref_mla.plan_payload(nblk, P)
        lowest = ref_mla.MIN_SPLIT_BLOCKS + ref_mla.FIXED_SPLIT_COST
        assert payload >= lowest
        fits = ref_mla._walk_fits(nblk, payload, P)
        assert not any(ref_mla._walk_fits(nblk, c, P) for c in range(lowest, payload)), (lens, P, payload)
        # FlashMLA's payload is the fallback when nothing smaller fits.
        total = sum(n + ref_mla.FIXED_SPLIT_COST for n in nblk)
        assert payload <= max((total + P - 1) // P, ref_mla.MIN_SPLIT_BLOCKS) + ref_mla.FIXED_SPLIT_COST
        assert fits or payload == max((total + P - 1) // P, ref_mla.MIN_SPLIT_BLOCKS) + ref_mla.FIXED_SPLIT_COST


@pytest.mark.parametrize("lens,P,max_blocks,busy", [([4096] * 2, 66, 2, 64), ([4096] * 3, 66, 3, 66),
                                                    ([1024] * 32, 66, 8, 64), ([4096] * 4, 132, 2, 128)])
def test_plan_fills_the_parts(lens, P, max_blocks, busy):
    # Small batches: pieces as short as P parts allow (the critical path), not ceil(total / P) + fixed
    # cost units, which left 22 of 66 parts idle at two requests of 4096 keys (3-block pieces).
    plan = ref_mla.mla_decode_plan(torch.tensor(lens, dtype=torch.int32), 1, 128, P).tolist()
    pieces, used = [], 0
    for p in range(P):
        b0, blk0, b1, blk1, _ = plan[8 * p: 8 * p + 5]
        used += b1 >= b0
        for i in range(b0, b1 + 1):
            pieces.append((blk1 if i == b1 else (lens[i] + 63) // 64) - (blk0 if i == b0 else 0))
    assert max(pieces) == max_blocks and used == busy


@pytest.mark.parametrize("seed", range(6))
def test_plan_split_list(seed):
    # Ints 5-7 of part e hold the e-th split request, its ws_base and num_splits (-1, 0, 0 past the
    # last): the combine launches one CTA row per possible entry (min(batch, P - 1)) and merges only
    # what the list names, so a request missing from it would keep NaN outputs on the GPU. The bound
    # P - 1 is what sizes that grid: each split request holds one of the P - 1 part boundaries.
    g = torch.Generator().manual_seed(seed)
    P = [2, 7, 66, 132, 66, 9][seed]
    b = int(torch.randint(1, 300, (1,), generator=g))
    lens = torch.randint(0, 9000, (b,), generator=g, dtype=torch.int32)
    if seed == 4:  # a uniform batch of 128 requests: two whole requests per part, an empty list
        lens = torch.full((128,), 4096, dtype=torch.int32)
    plan = ref_mla.mla_decode_plan(lens, 1, 128, P).tolist()
    per_req = plan[8 * P:]
    split = [i for i in range(len(lens)) if per_req[2 * i + 1] > 1]
    assert len(split) <= P - 1
    listed = []
    for e in range(P):
        r, base, n = plan[8 * e + 5: 8 * e + 8]
        if r < 0:
            assert (base, n) == (0, 0) and all(plan[8 * k + 5] == -1 for k in range(e, P))
            break
        assert (base, abs(n)) == (per_req[2 * r], per_req[2 * r + 1])
        # Negative: the request's two pieces are exactly parts 2c and 2c + 1 (a 2-CTA cluster).
        parts = [c for c in range(P) if plan[8 * c] <= r <= plan[8 * c + 2]]
        pair = (n == 2 or n == -2) and len(parts) == 2 and parts[0] % 2 == 0 and all(
            plan[8 * c] == plan[8 * c + 2] == r for c in parts)
        assert (n < 0) == pair, (r, n, parts)
        listed.append(r)
    assert listed == split
    if seed == 4:
        assert listed == []


@pytest.mark.parametrize("lens,P", [([4096], 132), ([100], 132), ([64, 64], 132), ([8192], 132)])
def test_plan_min_split_blocks(lens, P):
    # A tiny total is not cut into one-block pieces: every piece but a request's last holds at least
    # two blocks (MIN_SPLIT_BLOCKS), and the pieces cover every block exactly once.
    plan = ref_mla.mla_decode_plan(torch.tensor(lens, dtype=torch.int32), 1, 16, P).tolist()
    nblk = [(n + 63) // 64 for n in lens]
    covered = [0] * len(lens)
    for p in range(P):
        b0, blk0, b1, blk1, _ = plan[8 * p: 8 * p + 5]
        for i in range(b0, b1 + 1):
            lo = blk0 if i == b0 else 0
            hi = blk1 if i == b1 else nblk[i]
            covered[i] += hi - lo
            if hi < nblk[i]:  # a piece that does not end its request
                assert hi - lo >= 2  # one-block pieces measured slower (docs/performance.md, session 7)
    assert covered == nblk


def test_opcheck_cpu():
    case = make_case(3, 2, 3, [0, 20, 50], 16, nan_fill=False)
    plan = ops.mla_decode_plan(case["cache_seqlens"], 2, 3, 4)
    opcheck(torch.ops.flashseek.mla_decode_plan.default, (case["cache_seqlens"], 2, 3, 4))
    out = torch.empty(3, 2, 3, 512, dtype=torch.bfloat16)
    lse = torch.empty(3, 3, 2)
    opcheck(torch.ops.flashseek.mla_decode.default,
            (case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], plan, SCALE, True, out, lse))
    for fp8 in (False, True):
        cache = ops.empty_mla_cache(2, 16, fp8=fp8, device="cpu").zero_()
        opcheck(torch.ops.flashseek.mla_cache_append.default,
                (torch.randn(3, 512).bfloat16(), torch.randn(3, 64).bfloat16(), cache,
                 torch.tensor([0, -1, 31], dtype=torch.int64)))


def _bad_cases(device):
    case = make_case(2, 1, 4, [10, 40], 16, device=device, nan_fill=False)
    q, kv, bt, sl = case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"]
    plan = ops.mla_decode_plan(sl, 1, 4, 4)
    out = torch.empty(2, 1, 4, 512, dtype=torch.bfloat16, device=device)
    lse = torch.empty(2, 4, 1, device=device)
    std = dict(q=q, kv_cache=kv, block_table=bt, cache_seqlens=sl, plan=plan, softmax_scale=SCALE,
               causal=False, out=out, lse=lse)

    def with_(**kw):
        return {**std, **kw}

    return [
        (with_(q=q[..., :512].contiguous()), "head dim must be 576"),
        (with_(q=q.float()), "q must have dtype"),
        (with_(q=torch.randn(2, 1, 4, 1152, device=device).bfloat16()[..., ::2]), "unit stride"),
        (with_(kv_cache=torch.zeros(kv.shape[0], 8, 576, dtype=torch.bfloat16, device=device)), "page size"),
        (with_(kv_cache=torch.zeros(2, 16, 656, dtype=torch.bfloat16, device=device)), "kv_cache must be"),
        (with_(kv_cache=torch.zeros(2, 16, 576, dtype=torch.float16, device=device)), "kv_cache must have dtype"),
        (with_(kv_cache=torch.zeros(2, 576, 16, dtype=torch.bfloat16, device=device).transpose(1, 2)),
         "kv_cache must be contiguous"),
        (with_(block_table=bt.long()), "block_table must have dtype"),
        (with_(block_table=bt[:1]), "block_table must be"),
        (with_(cache_seqlens=sl.long()), "cache_seqlens must have dtype"),
        (with_(plan=plan[:-1]), "plan must come from mla_decode_plan"),
        (with_(out=out.half()), "out must have dtype"),
        (with_(out=out[..., :256]), "out must have shape"),
        (with_(lse=lse.reshape(2, 1, 4)), "lse must have shape"),
    ]


def _call(kw):
    torch.ops.flashseek.mla_decode(kw["q"], kw["kv_cache"], kw["block_table"], kw["cache_seqlens"], kw["plan"],
                                   kw["softmax_scale"], kw["causal"], kw["out"], kw["lse"])


@pytest.mark.parametrize("idx", range(14))
def test_bad_inputs_cpu(idx):
    kw, match = _bad_cases("cpu")[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        _call(kw)


def test_bad_index_values_cpu():
    case = make_case(2, 1, 4, [10, 40], 16, nan_fill=False)
    bt = case["block_table"].clone()
    bt[1, 2] = 999
    with pytest.raises(ValueError, match="block_table entries in use"):
        run_op({**case, "block_table": bt}, False)
    sl = torch.tensor([10, 16 * bt.shape[1] + 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        run_op({**case, "cache_seqlens": sl}, False)
    with pytest.raises(ValueError, match="slot_mapping entries"):
        ops.mla_cache_append(torch.zeros(1, 512).bfloat16(), torch.zeros(1, 64).bfloat16(), case["kv_cache"],
                             torch.tensor([10**6]))
    with pytest.raises(ValueError, match="latent must have shape"):
        ops.mla_cache_append(torch.zeros(1, 576).bfloat16(), torch.zeros(1, 64).bfloat16(), case["kv_cache"],
                             torch.tensor([0]))


# ------------------------------------------------------------------------------------- CUDA
SWEEP = dict(b=[1, 2, 6, 64, 129], s_q=[1, 2, 4], s_k=[1, 20, 140, 4096, 16384], h_q=[1, 3, 16, 63, 64, 128],
             varlen=[False, True], causal=[False, True], page_size=list(ref_mla.PAGE_SIZES), fp8=[False, True],
             qdtype=[torch.bfloat16, torch.float16])


def _sweep_cases(n):
    """A deterministic subsample of the full product in which every value of every axis appears."""
    rng = random.Random(20261126)
    keys = list(SWEEP)
    cases = []
    for i in range(n):
        # The first cases walk each axis through all its values; the rest are random.
        cases.append(tuple(SWEEP[k][i % len(SWEEP[k])] if i < 6 else rng.choice(SWEEP[k]) for k in keys))
    return [dict(zip(keys, c)) for c in cases]


def _lens(b, s_k, varlen, rng):
    if not varlen:
        return [s_k] * b
    lens = [rng.randint(0, s_k) for _ in range(b)]
    if b > 1:
        lens[rng.randrange(b)] = 0  # an empty request among others
    return lens


def softmax_abs_v(case, causal, q=None, scale=SCALE):
    """softmax(q k^T) @ |v| per element: the scale of the error that rounding P to bf16 for the
    tensor cores can cause (at most 2^-8 of it, since every weight moves by at most 2^-8 relative)."""
    q = case["q"] if q is None else q
    cache, table = case["kv_cache"], case["block_table"]
    b, s_q, h_q, _ = q.shape
    ps = cache.shape[1]
    res = torch.zeros(b, s_q * h_q, 512, device=q.device)
    for i, n in enumerate(case["cache_seqlens"].tolist()):
        if n == 0:
            continue
        kv = ref_mla.cache_as_float(cache[table[i, :(n + ps - 1) // ps].long()]).reshape(-1, 576)[:n]
        s = q[i].float().reshape(s_q * h_q, 576) @ kv.t() * scale
        if causal:
            lim = (n - s_q + torch.arange(s_q, device=q.device) + 1).repeat_interleave(h_q)
            s = s.masked_fill(torch.arange(n, device=q.device)[None, :] >= lim[:, None], -math.inf)
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        res[i] = p @ kv[:, :512].abs()
    return res.reshape(b, s_q, h_q, 512)


def assert_bf16_budget(o, ref_out, pav, out_dtype):
    """cos_diff < 1e-5, and max abs < 1e-3 beyond the roundings that 16-bit formats impose on a split-KV
    kernel of this kind:
    - the output dtype's half ulp (2^-8 |out| for bf16, 2^-11 for fp16; alone it exceeds 1e-3 once
      |out| > 0.25);
    - P rounded to bf16 for the PV MMA (each weight by <= 2^-8 relative, so <= 2^-8 softmax @ |v|;
      FlashMLA rounds P the same way);
    - a split request's normalised partials, kept in the output dtype (as FlashInfer keeps them) and
      merged with weights summing to 1: each element by <= half an ulp relative, so <= 2^-8 (2^-11)
      softmax @ |v| in all."""
    o = o.float()
    if ref_out.abs().max() == 0:
        assert torch.all(o == 0)
        return
    cd = cos_diff(o, ref_out)
    assert cd < 1e-5, f"cos_diff {cd}"
    half_ulp = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}.get(out_dtype, 0.0)
    err = (o - ref_out).abs() - half_ulp * ref_out.abs() - (2.0**-8 + half_ulp) * pav
    assert err.max() < 1e-3, f"max abs error beyond the bf16 roundings {err.max()}"


def fp8_direct_kernel(case):
    """Whether the FP8 cache's decode runs the kernel that dequantizes into the MMA fragments (tiles of
    up to 32 rows, unless FLASHSEEK_MLA_DECODE=staged picks the bf16-tile kernel)."""
    b, s_q, h_q, _ = case["q"].shape
    return s_q * h_q <= 32 and os.environ.get("FLASHSEEK_MLA_DECODE") != "staged"


def check_against_reference(case, out, lse, causal):
    """bf16 cache: assert_bf16_budget. FP8 cache: cos_diff <= 1e-3 against the reference on the
    dequantized cache (the staged kernels round the dequantized values to bf16 for the tensor cores);
    the direct kernel, which multiplies the exact e4m3 values by their scales in fp32, is held to the
    bf16 budget against that reference."""
    q = case["q"]
    fp8 = case["kv_cache"].dtype == torch.uint8
    if fp8 and fp8_direct_kernel(case):
        # Its latent q is exact in f16 (a power-of-two row factor keeps it in range); the rope part
        # meets the bf16 K rope in a bf16 MMA, so an fp16 q's rope is rounded to bf16 there.
        q_used = torch.cat([q[..., :512].float(), q[..., 512:].bfloat16().float()], dim=-1)
        ref_out, ref_lse = ref_mla.mla_decode(q_used, case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                              SCALE, causal)
        assert not torch.isnan(out).any(), "an output element was never written (poisoned with NaN)"
        assert_bf16_budget(out.float(), ref_out, softmax_abs_v(case, causal, q_used), out.dtype)
        assert_lse_close(lse, ref_lse, 1e-3)
        return
    # The MMAs run in bf16, so an fp16 q is rounded to bf16 first (the cache itself is bf16, so this
    # matches its precision); the budget is checked against the reference on that rounded q, and the
    # exact-q reference must still agree to cos_diff < 1e-4.
    q_used = q.bfloat16() if q.dtype == torch.float16 else q
    ref_out, ref_lse = ref_mla.mla_decode(q_used, case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                          SCALE, causal)
    assert not torch.isnan(out).any(), "an output element was never written (poisoned with NaN)"
    o = out.float()
    if fp8:
        if ref_out.abs().max() == 0:
            assert torch.all(o == 0)
        else:
            cd = cos_diff(o, ref_out)
            assert cd <= 1e-3, f"cos_diff {cd}"
    else:
        assert_bf16_budget(o, ref_out, softmax_abs_v(case, causal, q_used), out.dtype)
    if q.dtype == torch.float16 and ref_out.abs().max() > 0:
        exact, _ = ref_mla.mla_decode(q, case["kv_cache"], case["block_table"], case["cache_seqlens"],
                                      SCALE, causal)
        assert cos_diff(o, exact) < 1e-4
    # lse: fp32 statistics of the scores, held to the bf16 budget (1e-3) against the reference on the
    # operands the kernel consumes. For the FP8 cache those are the dequantized values rounded to bf16
    # for the tensor cores; that rounding alone moves a score by up to 2^-8 * scale * sum|q k|
    # (measured up to 1e-2 on random data), which is the format's cost, bounded by the cos-diff budget above.
    if fp8:
        operands = ref_mla.cache_as_float(case["kv_cache"]).bfloat16()
        _, ref_lse = ref_mla.mla_decode(q_used, operands, case["block_table"], case["cache_seqlens"], SCALE, causal)
    assert_lse_close(lse, ref_lse, 1e-3)


# Tiles with several kernels, forced per call by FLASHSEEK_MLA_DECODE: the bf16 cache's tiles, all 64
# rows (by default the Q-in-registers kernel mla_decode_qreg.cuh for two or more row tiles at batch >= 8,
# below that the turn-taking one mla_decode_seesaw.cuh for s_q >= 2 with four or more row tiles, the
# two-warpgroup kernel mla_decode_wgmma.cuh otherwise; =wgmma / =seesaw / =qreg force one) and the FP8
# cache's tiles of up to 32 rows (mla_decode_fp8_direct.cuh by default, the bf16-tile mma.sync kernel
# with =staged). "default" runs every tile's default kernel.
MLA_IMPLS = ["default", "wgmma", "seesaw", "qreg", "staged"]


def _use_impl(monkeypatch, impl, rows=None, fp8=False):
    if impl in ("wgmma", "seesaw", "qreg") and fp8:
        pytest.skip("one kernel serves this tile and cache")
    if impl == "staged" and (not fp8 or rows is not None and rows > 32):
        pytest.skip("one kernel serves this tile and cache")
    if impl == "default":
        monkeypatch.delenv("FLASHSEEK_MLA_DECODE", raising=False)
    else:
        monkeypatch.setenv("FLASHSEEK_MLA_DECODE", impl)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
@pytest.mark.parametrize("cfg", _sweep_cases(12 if REDUCED else 64), ids=lambda c: "-".join(
    f"{k}{v}" if not isinstance(v, torch.dtype) else str(v)[6:] for k, v in c.items()))
def test_decode_sweep_cuda(cfg, impl, monkeypatch):
    _use_impl(monkeypatch, impl, cfg["s_q"] * cfg["h_q"], cfg["fp8"])
    rng = random.Random(str(cfg))
    b, s_k = cfg["b"], cfg["s_k"]
    if REDUCED:
        b, s_k = min(b, 6), min(s_k, 4096)
    lens = _lens(b, s_k, cfg["varlen"], rng)
    case = make_case(b, cfg["s_q"], cfg["h_q"], lens, cfg["page_size"], fp8=cfg["fp8"], qdtype=cfg["qdtype"],
                     device="cuda", gen_seed=rng.randrange(1 << 30))
    out = poison_(torch.empty(b, cfg["s_q"], cfg["h_q"], 512, dtype=cfg["qdtype"], device="cuda"))
    lse = poison_(torch.empty(b, cfg["h_q"], cfg["s_q"], device="cuda"))
    run_op(case, cfg["causal"], out=out, lse=lse)
    check_against_reference(case, out, lse, cfg["causal"])


@pytest.mark.cuda
@pytest.mark.parametrize("P", [1, 3, 132, 1000])
@pytest.mark.parametrize("fp8", [False, True])
def test_decode_split_paths_cuda(P, fp8):
    # P = 1: one part, no workspace (direct writes only); large P: many splits per request, combine.
    lens = [0, 1, 63, 64, 65, 5000, 777, 3]
    case = make_case(len(lens), 2, 16, lens, 32, fp8=fp8, device="cuda", gen_seed=P)
    out = poison_(torch.empty(len(lens), 2, 16, 512, dtype=torch.bfloat16, device="cuda"))
    lse = poison_(torch.empty(len(lens), 16, 2, device="cuda"))
    run_op(case, True, num_sm_parts=P, out=out, lse=lse)
    check_against_reference(case, out, lse, True)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
@pytest.mark.parametrize("s_q,h_q", [(1, 16), (2, 8), (1, 17), (2, 16), (1, 32), (1, 33), (4, 16), (1, 65),
                                     (3, 43), (8, 128)])
@pytest.mark.parametrize("fp8", [False, True])
def test_decode_row_tiles_cuda(s_q, h_q, fp8, impl, monkeypatch):
    _use_impl(monkeypatch, impl, s_q * h_q, fp8)
    # FP8: s_q * h_q <= 16 / <= 32 / more select the 16-, 32- and 64-row CTA tiles; edges on both sides
    # (the bf16 cache runs 64-row tiles for all of them).
    lens = [1, 200, 0, 1500]
    case = make_case(len(lens), s_q, h_q, lens, 16, fp8=fp8, device="cuda", gen_seed=s_q * 1000 + h_q)
    out = poison_(torch.empty(len(lens), s_q, h_q, 512, dtype=torch.bfloat16, device="cuda"))
    lse = poison_(torch.empty(len(lens), h_q, s_q, device="cuda"))
    run_op(case, True, out=out, lse=lse)
    check_against_reference(case, out, lse, True)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
@pytest.mark.parametrize("page_size", ref_mla.PAGE_SIZES)
@pytest.mark.parametrize("P", [1, 7, 132, 1000])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_decode_block_pairs_cuda(impl, page_size, P, s_q, causal, monkeypatch):
    # The turn-taking kernel takes key blocks in pairs and has separate code for a piece that ends
    # with one, two or three blocks left, and for the tail block (rows past the end zeroed after
    # they land); split counts from 1 to 1000 give pieces of every length from 1 block up.
    _use_impl(monkeypatch, impl)
    lens = [0, 1, 63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257, 4113, 5000]
    case = make_case(len(lens), s_q, 128, lens, page_size, device="cuda", gen_seed=P * 7 + page_size + s_q)
    out = poison_(torch.empty(len(lens), s_q, 128, 512, dtype=torch.bfloat16, device="cuda"))
    lse = poison_(torch.empty(len(lens), 128, s_q, device="cuda"))
    run_op(case, causal, num_sm_parts=P, out=out, lse=lse)
    check_against_reference(case, out, lse, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
@pytest.mark.parametrize("page_size", ref_mla.PAGE_SIZES)
@pytest.mark.parametrize("P", [1, 7, 132, 1000])
@pytest.mark.parametrize("s_q,h_q,causal,qdtype", [(1, 16, False, torch.bfloat16), (2, 8, True, torch.float16),
                                                   (1, 3, True, torch.bfloat16), (2, 16, True, torch.bfloat16),
                                                   (3, 7, False, torch.float16)])
def test_decode_fp8_narrow_cuda(impl, page_size, P, s_q, h_q, causal, qdtype, monkeypatch):
    # FP8 cache, tiles of up to 16 and 32 rows. The direct kernel's loads run ahead across the requests of a
    # part (P = 1: one part holds them all) and copy only the tokens before each request's end, so the
    # rows after it keep stale bytes (NaN-filled pages, earlier blocks) that must not reach the output.
    # q rows span 2^-14 .. 2^4 in magnitude: each row is rescaled by its own power of two for the f16 MMAs.
    _use_impl(monkeypatch, impl, s_q * h_q, True)
    lens = [0, 1, 63, 64, 65, 127, 128, 129, 300, 0, 4113, 5000, 17]
    case = make_case(len(lens), s_q, h_q, lens, page_size, fp8=True, qdtype=qdtype, device="cuda",
                     gen_seed=P * 5 + page_size + s_q)
    row_scale = torch.logspace(-14, 4, s_q * h_q, base=2.0, device="cuda").reshape(1, s_q, h_q, 1)
    case["q"] = (case["q"].float() * row_scale).to(qdtype)
    out = poison_(torch.empty(len(lens), s_q, h_q, 512, dtype=qdtype, device="cuda"))
    lse = poison_(torch.empty(len(lens), h_q, s_q, device="cuda"))
    run_op(case, causal, num_sm_parts=P, out=out, lse=lse)
    check_against_reference(case, out, lse, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
@pytest.mark.parametrize("slope", [0.02, 0.2, -0.02])
@pytest.mark.parametrize("s_q,causal", [(1, False), (2, True)])
def test_decode_moving_max_cuda(impl, slope, s_q, causal, monkeypatch):
    # The 64-row kernels move a row's reference max only when a block's max exceeds it by more than
    # wg::kRescaleSlack (2^8 in P), and skip rescaling O for a warp whose rows all kept theirs. Scores
    # that climb along the keys (rope dims of token t shifted by slope * t, q's rope dims 0.5) move the
    # max by ~4 log2 units a 64-key block (0.02: blocks alternate between keeping and moving it), by
    # ~40 (0.2: every block moves it), or never past the first block (-0.02).
    _use_impl(monkeypatch, impl)
    lens, ps = [0, 1, 300, 2000], 64
    case = make_case(len(lens), s_q, 128, lens, ps, device="cuda", gen_seed=int(slope * 1000) + s_q)
    case["q"][..., 512:] = 0.5
    cache, table = case["kv_cache"], case["block_table"]
    for i, n in enumerate(lens):
        t = torch.arange(n, device="cuda")
        pages, slots = table[i, t // ps].long(), t % ps
        cache[pages, slots, 512:] = (cache[pages, slots, 512:].float() + slope * t[:, None]).bfloat16()
    out = poison_(torch.empty(len(lens), s_q, 128, 512, dtype=torch.bfloat16, device="cuda"))
    lse = poison_(torch.empty(len(lens), 128, s_q, device="cuda"))
    run_op(case, causal, out=out, lse=lse)
    check_against_reference(case, out, lse, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("impl", MLA_IMPLS)
def test_decode_zero_lengths_cuda(impl, monkeypatch):
    _use_impl(monkeypatch, impl)
    case = make_case(5, 2, 64, [0] * 5, 64, device="cuda")
    out, lse = run_op(case, True, out=poison_(torch.empty(5, 2, 64, 512, dtype=torch.bfloat16, device="cuda")))
    assert torch.all(out == 0) and torch.all(lse == -math.inf)


# q and out as views: "heads" strides heads and rows (no single row stride: the 64-row kernels load q
# per thread), "rows" pads each row (one row stride: q by TMA).
@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["heads", "rows"])
@pytest.mark.parametrize("h_q", [16, 64])
def test_decode_strided_q_out_cuda(layout, h_q):
    case = make_case(3, 2, h_q, [100, 0, 3000], 64, device="cuda")
    if layout == "heads":
        q = torch.randn(3, 2, 2 * h_q, 640, device="cuda").bfloat16()[:, :, ::2, :576]
    else:
        q = torch.randn(3, 2, h_q, 640, device="cuda").bfloat16()[..., 64:640]
    q.copy_(case["q"])
    obig = poison_(torch.empty(3, 2, h_q, 1024, dtype=torch.bfloat16, device="cuda"))
    out = obig[..., 256:768]
    o, lse = run_op({**case, "q": q}, True, out=out)
    check_against_reference(case, o, lse, True)
    assert torch.isnan(obig[..., :256]).all() and torch.isnan(obig[..., 768:]).all()


BF16, FP16 = torch.bfloat16, torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("h_q,b,s_k,fp8,impl,qdtype,page", [
    (64, 64, 4096, False, "default", BF16, 64), (64, 64, 4096, True, "default", BF16, 64),
    (64, 64, 4096, False, "default", FP16, 16), (16, 64, 4096, False, "default", BF16, 32),
    (128, 32, 1024, False, "default", BF16, 64), (128, 32, 1024, False, "qreg", FP16, 128),
    (128, 32, 1024, False, "wgmma", BF16, 64), (2, 64, 4096, False, "default", BF16, 64),
    (128, 32, 1024, False, "seesaw", BF16, 64)])
@pytest.mark.parametrize("varlen", [False, True])
def test_decode_cluster_pairs_cuda(h_q, b, s_k, fp8, impl, qdtype, page, varlen, monkeypatch):
    # Batches where the plan puts most requests in exactly two parts of one 2-CTA cluster: the decode
    # merges those through distributed shared memory and the combine the rest (varlen mixes both). The
    # turn-taking kernel does not merge pairs, and at h_q = 2 the decode is not launched in clusters: the
    # combine must then merge the marked pairs too.
    _use_impl(monkeypatch, impl, fp8=fp8)
    rng = random.Random(b + h_q)
    lens = [max(int(rng.normalvariate(s_k, s_k / 2)), 1) for _ in range(b)] if varlen else [s_k] * b
    case = make_case(b, 1, h_q, lens, page, fp8=fp8, qdtype=qdtype, device="cuda", gen_seed=b + h_q)
    plan = ops.mla_decode_plan(case["cache_seqlens"], 1, h_q)
    P = ref_mla.plan_num_sm_parts(plan.numel(), b)
    marks = [plan[8 * e + 7].item() for e in range(P)]
    assert varlen or any(n < 0 for n in marks), marks
    outs = []
    for _ in range(2):
        out = poison_(torch.empty(b, 1, h_q, 512, dtype=qdtype, device="cuda"))
        lse = poison_(torch.empty(b, h_q, 1, device="cuda"))
        ops.mla_decode(case["q"], case["kv_cache"], case["block_table"], case["cache_seqlens"], plan, SCALE,
                       False, out=out, lse=lse)
        outs.append((out, lse))
    check_against_reference(case, outs[0][0], outs[0][1], False)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def _qreg_instantiations(fn):
    """The Q-in-registers kernel's multicast template flags (True / False) of the launches `fn` made, or
    None where the profiler records no kernel at all (CUPTI is unavailable under compute-sanitizer)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    if not names:
        return None
    return {("bfloat16, true" in n or "__half, true" in n or "Lb1E" in n) for n in names if "mla_decode_qreg_kernel" in n}


@pytest.mark.cuda
@pytest.mark.parametrize("b,s_q,h_q,page,qdtype,causal,varlen,parts", [
    (129, 1, 128, 64, BF16, False, False, None),  # the default rule's regime (batch >= parts)
    (8, 1, 128, 16, BF16, False, True, None),     # 16-token pages: four boxes a panel; lengths from 0
    (9, 2, 64, 32, FP16, True, True, None),       # a pair of tiles with different causal limits (s = 0, 1)
    (5, 4, 64, 128, BF16, True, False, 3),        # four tiles (two pairs), several pieces a part
    (12, 1, 96, 64, BF16, False, True, 5),        # the second tile half empty (rows 64-95)
    (3, 8, 16, 64, FP16, True, False, 2)])        # s_q = 8: 128 rows of 16 heads
def test_decode_multicast_pairs_cuda(b, s_q, h_q, page, qdtype, causal, varlen, parts, monkeypatch):
    # The Q-in-registers kernel with its two row tiles as a 2-CTA cluster loading each key block once for
    # both (TMA multicast): forced on and off, it must give the reference's result and the same bits (the
    # math and its order are the same; only who loads a panel differs), and the profile must show that
    # the multicast instantiation really ran.
    monkeypatch.setenv("FLASHSEEK_MLA_DECODE", "qreg")
    rng = random.Random(b * 31 + h_q)
    lens = ([0] + [rng.randint(1, 3000) for _ in range(b - 1)]) if varlen else [2000 + 37 * b] * b
    case = make_case(b, s_q, h_q, lens, page, qdtype=qdtype, device="cuda", gen_seed=b + h_q)
    plan = ops.mla_decode_plan(case["cache_seqlens"], s_q, h_q, parts)
    res = {}
    for mc in ("1", "0"):
        monkeypatch.setenv("FLASHSEEK_MLA_MULTICAST", mc)
        out = poison_(torch.empty(b, s_q, h_q, 512, dtype=qdtype, device="cuda"))
        lse = poison_(torch.empty(b, h_q, s_q, device="cuda"))
        ran = _qreg_instantiations(lambda: ops.mla_decode(case["q"], case["kv_cache"], case["block_table"],
                                                          case["cache_seqlens"], plan, SCALE, causal, out=out, lse=lse))
        assert ran is None or ran == {mc == "1"}, ran
        res[mc] = (out, lse)
    check_against_reference(case, res["1"][0], res["1"][1], causal)
    assert torch.equal(res["1"][0], res["0"][0]) and torch.equal(res["1"][1], res["0"][1])


@pytest.mark.cuda
@pytest.mark.parametrize("P", [1, 5, 66, 132, 4096])
def test_plan_kernel_matches_reference_cuda(P):
    rng = random.Random(P)
    for lens in ([0], [7], [160 * 1024] * 3, [rng.randint(0, 40000) for _ in range(1024)],
                 [rng.choice([0, 64, 65]) for _ in range(129)]):
        sl = torch.tensor(lens, dtype=torch.int32)
        got = ops.mla_decode_plan(sl.cuda(), 2, 128, P).cpu()
        assert torch.equal(got, ref_mla.mla_decode_plan(sl, 2, 128, P))


@pytest.mark.cuda
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cache_append_cuda_matches_reference(fp8, dtype):
    cache = ops.empty_mla_cache(8, 64, fp8=fp8, device="cuda")
    cache.view(torch.uint8).fill_(0xAB)
    ref = cache.cpu().clone()
    kv = (torch.randn(300, 576) * torch.logspace(-5, 3, 300)[:, None]).to(dtype)
    kv[3, :128] = 0  # a block at the scale floor
    slots = torch.randperm(8 * 64)[:300].long()
    slots[::7] = -1
    ops.mla_cache_append(kv[:, :512].cuda(), kv[:, 512:].cuda(), cache, slots.cuda())
    ref_mla.mla_cache_append(kv[:, :512], kv[:, 512:], ref, slots)
    # Same fp32 operations (amax, max(amax, 1e-4) / 448, x / scale, RNE to e4m3): identical bytes.
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))
    # Slots past the cache are skipped on the GPU (no sync to report them), never written.
    ops.mla_cache_append(kv[:2, :512].cuda(), kv[:2, 512:].cuda(), cache, torch.tensor([10**9, -5]).cuda())
    assert torch.equal(cache.cpu().view(torch.uint8), ref.view(torch.uint8))


@pytest.mark.cuda
@pytest.mark.parametrize("h_q,impl,fp8", [(16, "wgmma", False), (128, "wgmma", False), (128, "seesaw", False),
                                         (128, "qreg", False), (16, "wgmma", True), (16, "staged", True)])
def test_bad_indices_are_clamped_cuda(h_q, impl, fp8, monkeypatch):
    monkeypatch.setenv("FLASHSEEK_MLA_DECODE", impl)
    case = make_case(2, 1, h_q, [100, 300], 16, fp8=fp8, device="cuda")
    bt = case["block_table"].clone()
    bt[0, 1] = 1 << 30
    bt[1, 0] = -5
    sl = torch.tensor([100, 10**6], dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        ops.mla_decode(case["q"], case["kv_cache"], bt, sl, ops.mla_decode_plan(sl, 1, h_q), SCALE, validate=True)
    with pytest.raises(ValueError, match="block_table entries in use"):
        ops.mla_decode(case["q"], case["kv_cache"], bt, case["cache_seqlens"],
                       ops.mla_decode_plan(case["cache_seqlens"], 1, h_q), SCALE, validate=True)
    # Without validate: no out-of-bounds access (compute-sanitizer clean), garbage values allowed.
    out, lse = ops.mla_decode(case["q"], case["kv_cache"], bt, sl, ops.mla_decode_plan(sl, 1, h_q), SCALE)
    torch.cuda.synchronize()
    assert out.shape == (2, 1, h_q, 512)


@pytest.mark.cuda
@pytest.mark.parametrize("idx", range(14))
def test_bad_inputs_cuda(idx):
    kw, match = _bad_cases("cuda")[idx]
    with pytest.raises((ValueError, RuntimeError), match=match):
        _call(kw)


@pytest.mark.cuda
@pytest.mark.parametrize("fp8,h_q,impl", [(False, 16, "wgmma"), (True, 16, "wgmma"), (True, 16, "staged"),
                                          (False, 128, "wgmma"), (False, 128, "seesaw"), (False, 128, "qreg")])
def test_cuda_graph_capture(fp8, h_q, impl, monkeypatch):
    monkeypatch.setenv("FLASHSEEK_MLA_DECODE", impl)
    b, s_q, ps = 4, 2, 64
    lens = [100, 0, 2000, 60]  # two appended tokens stay within the pages held
    case = make_case(b, s_q, h_q, lens, ps, fp8=fp8, device="cuda", spare_pages=40)
    sl = case["cache_seqlens"].clone()
    q = case["q"].clone()
    out = torch.empty(b, s_q, h_q, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(b, h_q, s_q, device="cuda")
    new_lat = torch.zeros(b, 512, device="cuda").bfloat16()
    new_rope = torch.zeros(b, 64, device="cuda").bfloat16()
    new_slots = torch.full((b,), -1, dtype=torch.int64, device="cuda")

    def step():
        ops.mla_cache_append(new_lat, new_rope, case["kv_cache"], new_slots)
        plan = ops.mla_decode_plan(sl, s_q, h_q)
        ops.mla_decode(q, case["kv_cache"], case["block_table"], sl, plan, SCALE, True, out=out, lse=lse)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside the capture (allocator, function attributes)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # Replay with new lengths (one token appended to each non-empty request) and a new q.
    g = torch.Generator(device="cuda").manual_seed(3)
    for rep in range(2):
        lens = [n + 1 if n else 0 for n in lens]
        table = case["block_table"]
        for i, n in enumerate(lens):
            if n:
                t = n - 1
                new_slots[i] = int(table[i, t // ps]) * ps + t % ps
            else:
                new_slots[i] = -1
        new_lat.copy_(torch.randn(b, 512, device="cuda", generator=g))
        new_rope.copy_(torch.randn(b, 64, device="cuda", generator=g))
        sl.copy_(torch.tensor(lens, dtype=torch.int32))
        q.copy_(torch.randn(q.shape, device="cuda", generator=g))
        poison_(out)
        graph.replay()
        torch.cuda.synchronize()
        check_against_reference({**case, "q": q, "cache_seqlens": sl, "lens": lens}, out, lse, True)


@pytest.mark.cuda
def test_opcheck_cuda():
    case = make_case(3, 2, 3, [0, 20, 500], 16, device="cuda", nan_fill=False)
    sl = case["cache_seqlens"]
    plan = ops.mla_decode_plan(sl, 2, 3, 4)
    opcheck(torch.ops.flashseek.mla_decode_plan.default, (sl, 2, 3, 4))
    out = torch.empty(3, 2, 3, 512, dtype=torch.bfloat16, device="cuda")
    lse = torch.empty(3, 3, 2, device="cuda")
    opcheck(torch.ops.flashseek.mla_decode.default,
            (case["q"], case["kv_cache"], case["block_table"], sl, plan, SCALE, True, out, lse))
    for fp8 in (False, True):
        cache = ops.empty_mla_cache(2, 16, fp8=fp8, device="cuda").zero_()
        opcheck(torch.ops.flashseek.mla_cache_append.default,
                (torch.randn(3, 512, device="cuda").bfloat16(), torch.randn(3, 64, device="cuda").bfloat16(), cache,
                 torch.tensor([0, -1, 31], dtype=torch.int64, device="cuda")))
