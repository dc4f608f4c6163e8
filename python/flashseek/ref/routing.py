"""Top-k routing references: DeepSeek-V3 noaux_tc grouped top-k and plain softmax top-k.

These are the specification of the routing kernels. Choices the kernels reproduce bit for bit:
  * scores in fp32, sigmoid written as 1 / (1 + exp(-x)) (torch's own CUDA sigmoid is the same
    formula; the CPU one is not, so the CUDA kernel is compared with this reference run on CUDA);
  * ties are broken by the lower index: among equal group scores the lower group id is kept, among
    equal (biased) scores the lower expert id is picked first. Stable sorts make that explicit,
    since torch.topk promises no order among ties;
  * ids come out in selection order: descending score, ties by ascending id;
  * the renormalizing sum runs sequentially in selection order, so the kernel matches it exactly.
NaN logits give unspecified (but in-range) ids.
"""
import torch


def sigmoid_fp32(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return 1.0 / (1.0 + torch.exp(-x))


def _topk_stable(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest along the last dim; equal values: the lower index first."""
    return torch.sort(x, dim=-1, descending=True, stable=True)[1][..., :k]


def _seq_sum(w: torch.Tensor) -> torch.Tensor:
    acc = w[..., 0].clone()
    for j in range(1, w.shape[-1]):
        acc = acc + w[..., j]
    return acc.unsqueeze(-1)


def route_noaux_tc(logits: torch.Tensor, bias: torch.Tensor, n_group: int, topk_group: int, topk: int,
                   routed_scaling_factor: float, renormalize: bool = True):
    """logits [T, E] -> (weights fp32 [T, topk], ids int32 [T, topk]).

    s = sigmoid(logits); b = s + bias selects; group score = sum of the top-2 of b per group of
    E / n_group consecutive experts; the topk_group best groups survive; ids = top-k of b among
    their experts; weights = s[ids] (/ their sum + 1e-20 if renormalize) * routed_scaling_factor.
    """
    t, e = logits.shape
    s = sigmoid_fp32(logits)
    b = s + bias.float()
    if topk_group < n_group:
        g = b.view(t, n_group, e // n_group)
        top2 = torch.sort(g, dim=-1, descending=True)[0][..., :2]
        gscore = top2[..., 0] + top2[..., 1]
        keep = torch.zeros(t, n_group, dtype=torch.bool, device=logits.device)
        keep.scatter_(1, _topk_stable(gscore, topk_group), True)
        keep = keep.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)
        b = b.masked_fill(~keep, float("-inf"))
    ids = _topk_stable(b, topk)
    w = s.gather(1, ids)
    if renormalize:
        w = w / (_seq_sum(w) + 1e-20)
    w = w * routed_scaling_factor
    return w, ids.to(torch.int32)


def route_softmax_topk(logits: torch.Tensor, topk: int, renormalize: bool = True):
    """logits [T, E] -> (weights fp32 [T, topk], ids int32 [T, topk]), Mixtral / Qwen-MoE style.

    Selection is on the fp32 logits (softmax is monotone), ties to the lower id. With p = exp(x - max):
    weights = p[ids] / sum(p[ids]) (sequential, selection order) if renormalize, else p[ids] / sum(p).
    """
    x = logits.float()
    p = torch.exp(x - x.amax(dim=-1, keepdim=True))
    ids = _topk_stable(x, topk)
    w = p.gather(1, ids)
    if renormalize:
        w = w / _seq_sum(w)
    else:
        w = w / p.sum(dim=-1, keepdim=True)
    return w, ids.to(torch.int32)


#: The k-block of the fused gate GEMM (H % GATE_K_BLOCK == 0) and its token limit (csrc/routing/routing.h).
GATE_K_BLOCK = 512
GATE_MAX_T = 64


def gate_logits_fp32(hidden: torch.Tensor, gate_weight: torch.Tensor) -> torch.Tensor:
    """logits [T, E] fp32 = hidden [T, H] @ gate_weight [E, H]^T, summed in route_noaux_tc_gate's order.

    With k = 512 kb + 256 s + 8 l + i (kb < H / 512, s < 2, l < 32, i < 8) and p = x[k] * w[k] in fp32
    (exact for bf16 inputs):
      * lane partial P[kb, l]: sequential fp32 sum over (s, i) in lexicographic order, from 0;
      * block partial Q[kb]: pairwise tree over l, halves first: (l, l + 16), then (l, l + 8), ... (l, l + 1);
      * logit: Q[0] + Q[1] + ... left to right.
    The kernel's fma equals this add of the rounded product unless a product is subnormal or overflows.
    Slow (per token, [E, H] products); fine for the T <= 64 the op takes.
    """
    t, h = hidden.shape
    e = gate_weight.shape[0]
    assert h % GATE_K_BLOCK == 0
    nkb = h // GATE_K_BLOCK
    w = gate_weight.float().view(e, nkb, 2, 32, 8)
    out = torch.empty(t, e, dtype=torch.float32, device=hidden.device)
    for r in range(t):
        p = w * hidden[r].float().view(1, nkb, 2, 32, 8)
        acc = torch.zeros(e, nkb, 32, dtype=torch.float32, device=hidden.device)
        for s in range(2):
            for i in range(8):
                acc = acc + p[:, :, s, :, i]
        n = 32
        while n > 1:
            n //= 2
            acc = acc[..., :n] + acc[..., n:2 * n]
        q = acc[..., 0]  # [E, nkb]
        logit = q[:, 0].clone()
        for kb in range(1, nkb):
            logit = logit + q[:, kb]
        out[r] = logit
    return out


def route_noaux_tc_gate(hidden: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor, n_group: int,
                        topk_group: int, topk: int, routed_scaling_factor: float, renormalize: bool = True):
    """-> (weights, ids, logits): route_noaux_tc on gate_logits_fp32(hidden, gate_weight)."""
    logits = gate_logits_fp32(hidden, gate_weight)
    w, ids = route_noaux_tc(logits, bias, n_group, topk_group, topk, routed_scaling_factor, renormalize)
    return w, ids, logits


def router_logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The MoE router's logits, fp32 [T, E] = hidden [T, H] @ weight [E, H]^T with the bf16 inputs'
    products accumulated in fp32 (the kernel's order differs from this matmul's: the two agree to
    fp32 rounding of the sum, which the tests bound by the sum of |x w| terms)."""
    return hidden.float() @ weight.float().t()
