"""`flashseek generate`: run DeepSeek-V3/R1 generation and report tokens/s, TTFT, TPOT and KV-cache use.

Without --model it writes (once) and uses the embedded default, a tiny seeded R1-architecture FP8
checkpoint in the Hugging Face layout; --full-dims --num-layers N builds a random model at R1's
true sizes instead (for timing on one GPU).
"""
from __future__ import annotations

import os
import statistics
import sys
import time


def add_parser(subparsers):
    p = subparsers.add_parser("generate", help="generate tokens with a DeepSeek-V3/R1 checkpoint",
                              description=__doc__)
    p.add_argument("--model", default=None, help="checkpoint dir (HF layout); default: the embedded tiny model")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=None,
                   help="prompt token ids (default: a seeded random prompt of --prompt-len tokens)")
    p.add_argument("--prompt-len", type=int, default=32, help="length of the random prompt (default 32)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request (default 32)")
    p.add_argument("--batch", type=int, default=1, help="number of concurrent requests (default 1)")
    p.add_argument("--full-dims", action="store_true", help="a random model at DeepSeek-R1's true dimensions")
    p.add_argument("--num-layers", type=int, default=None, help="use only the first N layers")
    p.add_argument("--save-checkpoint", default=None, metavar="DIR",
                   help="with --full-dims: write the random model to DIR as an HF checkpoint, then load it")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--precision", choices=["fp8", "reference"], default="fp8",
                   help="fp8: the kernel path; reference: dequantized fp32 weights and activations")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens tokens")
    p.add_argument("--kv-cache-fp8", action="store_true", help="FP8 latent cache (656 bytes per token)")
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--max-batched-tokens", type=int, default=2048, help="token budget per step")
    p.add_argument("--stream", action="store_true", help="print each token of request 0 as it is sampled")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """Bad arguments, configs and checkpoints end in one line on stderr and exit status 2 (the
    traceback with FLASHSEEK_TRACEBACK=1); anything else propagates."""
    from flashseek.engine.kv_cache import OutOfPages

    try:
        return _run(args)
    except (ValueError, OutOfPages) as e:  # ConfigError and CheckpointError are ValueErrors
        if os.environ.get("FLASHSEEK_TRACEBACK") == "1":
            raise
        print(f"flashseek generate: error: {e} ({type(e).__name__}; FLASHSEEK_TRACEBACK=1 shows where)",
              file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from flashseek.engine.llm import LLM, default_device
    from flashseek.engine.sampling import SamplingParams

    device = args.device or default_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    if args.full_dims and args.model:
        raise ValueError("--full-dims builds a random model; it cannot be combined with --model")
    for name in ("batch", "max_batched_tokens") + (() if args.prompt_tokens else ("prompt_len",)):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # Checked before the model loads, which takes minutes for a real checkpoint.
    params = [SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seed=args.seed + i, ignore_eos=args.ignore_eos)
              for i in range(args.batch)]
    t0 = time.perf_counter()
    llm = LLM(args.model, device=device, precision=args.precision, num_layers=args.num_layers,
              full_dims=args.full_dims, max_num_seqs=args.batch,
              max_num_batched_tokens=args.max_batched_tokens, kv_cache_fp8=args.kv_cache_fp8,
              cuda_graphs=not args.no_cuda_graphs, save_dir=args.save_checkpoint)
    cfg = llm.model.cfg
    print(f"model: {getattr(llm.model, 'source', '?')}  ({cfg.summary()})")
    print(f"device: {device}  precision: {args.precision}  loaded in {time.perf_counter() - t0:.1f}s")
    vocab = cfg.vocab_size
    if args.prompt_tokens:
        prompts = [list(args.prompt_tokens)] * args.batch
    else:
        g = torch.Generator().manual_seed(args.seed)
        prompts = [torch.randint(2, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    peak = {"used": 0}

    def on_token(i, tok):
        peak["used"] = max(peak["used"], llm.cache.allocator.num_used)
        if args.stream and i == 0:
            print(tok, end=" ", flush=True)

    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, params, on_token=on_token)
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    if args.stream:
        print()
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(p) for p in prompts)
    ttft = [o.ttft_s for o in outs if o.ttft_s is not None]
    tpot = [o.tpot_s for o in outs if o.tpot_s is not None]
    usage = llm.kv_cache_usage()
    for i, o in enumerate(outs[: min(4, len(outs))]):
        print(f"request {i}: {len(o.prompt_token_ids)} prompt tokens -> {len(o.token_ids)} tokens "
              f"({o.finish_reason}): {o.token_ids[:16]}{' ...' if len(o.token_ids) > 16 else ''}")
    print(f"generated {n_out} tokens for {len(outs)} request(s) ({n_in} prompt tokens) in {wall:.2f}s: "
          f"{n_out / wall:.1f} tokens/s output, {(n_in + n_out) / wall:.1f} tokens/s total")
    if ttft:
        print(f"TTFT: mean {1e3 * statistics.mean(ttft):.1f} ms  max {1e3 * max(ttft):.1f} ms")
    if tpot:
        mean_tpot = statistics.mean(tpot)
        print(f"TPOT: mean {1e3 * mean_tpot:.2f} ms  ({1 / mean_tpot:.1f} tokens/s per request)")
    per_page = usage["bytes_total"] / max(usage["pages_total"] + 1, 1)
    print(f"KV cache: peak {peak['used']} of {usage['pages_total']} pages of {usage['page_size']} tokens "
          f"({100 * peak['used'] / max(usage['pages_total'], 1):.1f}%, {peak['used'] * per_page / 2**20:.1f} MiB of "
          f"{usage['bytes_total'] / 2**20:.0f} MiB, {'fp8' if args.kv_cache_fp8 else str(llm.model.cache_dtype)[6:]}); "
          f"now {usage['pages_used']} in use")
    runner = llm.engine.graph_runner
    if runner is not None:
        state = f"sizes {sorted(runner.graphs)}" if runner.graphs else f"disabled: {runner.disabled_reason}"
        print(f"CUDA graphs: {state}")
    return 0
