"""Engine: page accounting, continuous batching invariance, chunked prefill, sampling, stopping, streaming."""
import pytest
import torch

from flashseek.engine.engine import Engine
from flashseek.engine.kv_cache import BlockAllocator, BlockTable, OutOfPages, PagedKVCache
from flashseek.engine.llm import LLM
from flashseek.engine.sampling import Sampler, SamplingParams
from flashseek.models.deepseek.checkpoint import ensure_default_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, device="cpu", precision="reference", num_pages=64, progress=False)


def prompts(n, seed=0, lo=3, hi=90):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi, (n,), generator=g).tolist()
    return [torch.randint(2, 1024, (k,), generator=g).tolist() for k in lens]


def fresh_engine(llm, **kw):
    return Engine(llm.model, llm.cache, **kw)


# ---- allocator ----------------------------------------------------------------------------------
def test_allocator_accounting():
    a = BlockAllocator(8)
    assert a.capacity == 7 and a.num_free == 7
    p = a.allocate(3)
    assert 0 not in p and a.num_used == 3 and a.num_free == 4
    with pytest.raises(OutOfPages):
        a.allocate(5)
    a.free(p[:1])
    with pytest.raises(ValueError, match="double free"):
        a.free(p[:1])
    a.free(p[1:])
    assert a.num_used == 0 and a.num_free == 7


def test_block_table_slots():
    cache = PagedKVCache(1, 6, 64, torch.float32)
    t = BlockTable(cache)
    t.ensure(130)
    assert len(t.pages) == 3 and cache.allocator.num_used == 3
    s = t.slots(62, 66)
    assert s == [t.pages[0] * 64 + 62, t.pages[0] * 64 + 63, t.pages[1] * 64, t.pages[1] * 64 + 1]
    t.ensure(100)
    assert len(t.pages) == 3
    t.release()
    assert cache.allocator.num_used == 0


def test_engine_releases_pages_and_tracks_usage(llm):
    eng = fresh_engine(llm, max_num_seqs=8)
    reqs = [eng.add_request(p, SamplingParams(max_tokens=5, ignore_eos=True)) for p in prompts(3, 1, 60, 70)]
    eng.step()
    used = llm.cache.allocator.num_used
    assert used == sum(-(-len(r.prompt) // 64) for r in reqs)
    eng.run_to_completion()
    assert llm.cache.allocator.num_used == 0
    assert all(r.finish_reason == "length" and len(r.output) == 5 for r in reqs)


def test_admission_waits_for_pages(llm):
    small = PagedKVCache(llm.model.cfg.num_hidden_layers, 9, 64, llm.model.cache_dtype)
    eng = Engine(llm.model, small, max_num_seqs=8)
    cap = small.allocator.capacity * 64
    big = eng.add_request([5] * (cap // 2), SamplingParams(max_tokens=2, ignore_eos=True))
    big2 = eng.add_request([6] * (cap // 2), SamplingParams(max_tokens=2, ignore_eos=True))
    eng.step()
    assert big in eng.running and big2 in eng.waiting     # big2's reservation does not fit yet
    eng.run_to_completion()
    assert len(big2.output) == 2 and small.allocator.num_used == 0
    with pytest.raises(ValueError, match="exceeds the model length"):
        eng.add_request([1] * cap, SamplingParams(max_tokens=1))


# ---- batching invariance --------------------------------------------------------------------------
def _solo(llm, prompt, params):
    eng = fresh_engine(llm, max_num_seqs=1)
    r = eng.add_request(prompt, params)
    eng.run_to_completion()
    return r.output


def test_batched_equals_per_request_greedy(llm):
    ps = prompts(5, seed=2)
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (12, 5, 20, 1, 9)]
    solo = [_solo(llm, p, sp) for p, sp in zip(ps, params)]
    # Joining and leaving between steps, mixed prefill/decode, prefill chunked by a small budget.
    eng = fresh_engine(llm, max_num_seqs=3, max_num_batched_tokens=40)
    reqs = [eng.add_request(ps[0], params[0]), eng.add_request(ps[1], params[1])]
    for _ in range(3):
        eng.step()
    reqs += [eng.add_request(p, sp) for p, sp in zip(ps[2:], params[2:])]
    mixed_steps = 0
    while eng.has_unfinished():
        eng.step()
        st = eng.step_stats[-1]
        mixed_steps += st.num_decode > 0 and st.num_prefill_tokens > 0
    assert [r.output for r in reqs] == solo
    assert mixed_steps > 0
    assert llm.cache.allocator.num_used == 0


def test_llm_generate_api(llm):
    ps = prompts(3, seed=4)
    outs = llm.generate(ps, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [6, 6, 6]
    assert outs[0].token_ids == llm.generate(ps[0], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
    assert all(o.ttft_s is not None and o.tpot_s is not None for o in outs)


# ---- sampling ------------------------------------------------------------------------------------
def test_seeded_sampling_reproducible_and_batch_independent(llm):
    ps = prompts(3, seed=5)
    # A hot temperature: the tiny model's next-token margin is large (see checkpoint.random_tensor).
    sp = [SamplingParams(max_tokens=10, temperature=4.0, top_k=50, top_p=0.95, seed=s, ignore_eos=True)
          for s in (1, 2, 3)]
    a = [o.token_ids for o in llm.generate(ps, sp)]
    b = [o.token_ids for o in llm.generate(ps, sp)]
    c = llm.generate(ps[1], sp[1])[0].token_ids
    assert a == b and a[1] == c
    d = llm.generate(ps[0], SamplingParams(max_tokens=10, temperature=4.0, top_k=50, top_p=0.95, seed=99,
                                           ignore_eos=True))[0].token_ids
    assert d != a[0]


def test_sampler_filters():
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 4.8])
    assert Sampler(SamplingParams())(logits) == 1
    for seed in range(20):
        assert Sampler(SamplingParams(temperature=1.0, top_k=1, seed=seed))(logits) == 1
        assert Sampler(SamplingParams(temperature=5.0, top_p=0.01, seed=seed))(logits) == 1
        assert Sampler(SamplingParams(temperature=5.0, top_k=3, seed=seed))(logits) in (1, 2, 4)
    draws = {Sampler(SamplingParams(temperature=100.0, seed=s))(logits) for s in range(200)}
    assert draws == {0, 1, 2, 3, 4}
    with pytest.raises(ValueError):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError):
        SamplingParams(max_tokens=0)


@pytest.mark.parametrize("kwargs", [
    dict(max_tokens=2.5), dict(max_tokens=True), dict(temperature=float("nan")), dict(temperature=float("inf")),
    dict(temperature=-0.5), dict(temperature="1"), dict(top_k=-2), dict(top_k=2.5), dict(top_p=float("nan")),
    dict(top_p=1.5), dict(seed=1.5), dict(stop_token_ids=[1, "2"]),
])
def test_sampling_params_reject_bad_values(kwargs):
    # Rejected up front, with the field's name, rather than failing inside a decode step.
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_accept_edge_values():
    SamplingParams(temperature=0, top_k=-1, top_p=1, seed=0, stop_token_ids=[0])
    SamplingParams(temperature=1e-3, top_k=0, top_p=1e-6)
    import numpy as np
    sp = SamplingParams(max_tokens=np.int64(4), top_k=np.int32(5), temperature=np.float32(0.5), seed=np.int64(3))
    assert type(sp.seed) is int and type(sp.temperature) is float
    logits = torch.tensor([0.0, 5.0, 4.9, -1.0, 4.8])
    assert Sampler(sp)(logits) == Sampler(SamplingParams(max_tokens=4, top_k=5, temperature=0.5, seed=3))(logits)


# ---- stopping and streaming ----------------------------------------------------------------------
def test_stop_eos_and_streaming(llm):
    p = prompts(1, seed=6)[0]
    greedy = llm.generate(p, SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    eng = fresh_engine(llm)
    eng.eos = {greedy[3]}
    streamed = []
    r = eng.add_request(p, SamplingParams(max_tokens=8), on_token=lambda req, t: streamed.append(t))
    eng.run_to_completion()
    stop = greedy.index(greedy[3]) + 1
    assert r.finish_reason == "eos" and r.output == greedy[:stop] == streamed
    out = llm.generate(p, SamplingParams(max_tokens=8, stop_token_ids=[greedy[2]]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[: greedy.index(greedy[2]) + 1]
    got = []
    llm.generate([p, p], SamplingParams(max_tokens=3, ignore_eos=True), on_token=lambda i, t: got.append((i, t)))
    assert sorted(got) == sorted([(0, t) for t in greedy[:3]] + [(1, t) for t in greedy[:3]])


def test_bad_requests(llm):
    eng = fresh_engine(llm)
    with pytest.raises(ValueError, match="at least one token"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="out of range"):
        eng.add_request([5, 4000], SamplingParams())
