"""`flashseek.LLM(model_dir).generate(prompt_token_ids, sampling_params)`."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from flashseek.engine.engine import Engine, Request
from flashseek.engine.kv_cache import PAGE_SIZE, PagedKVCache
from flashseek.engine.sampling import SamplingParams
from flashseek.models.deepseek.checkpoint import ensure_default_model, write_checkpoint
from flashseek.models.deepseek.config import r1_config
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list
    token_ids: list
    finish_reason: str
    ttft_s: Optional[float]
    tpot_s: Optional[float]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class LLM:
    """A DeepSeek-V3/R1 model with a paged KV cache and a continuous-batching engine.

    model_dir None uses the embedded default (a tiny seeded R1-architecture FP8 checkpoint written
    to the cache dir on first use). full_dims builds a random model at R1's true sizes with
    num_layers layers directly on the device instead, or, with save_dir, writes it there as an HF
    checkpoint first and loads that.
    """

    def __init__(self, model_dir=None, device: Optional[str] = None, precision: str = "fp8",
                 num_layers: Optional[int] = None, full_dims: bool = False, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 2048, num_pages: Optional[int] = None, kv_cache_fp8: bool = False,
                 cuda_graphs: bool = True, prefill_mode: str = "decompressed", progress: bool = True,
                 seed: int = 1234, save_dir=None):
        device = device or default_device()
        t0 = time.perf_counter()
        if full_dims and save_dir is not None:
            model_dir = write_checkpoint(r1_config(num_layers or 4), save_dir, seed=seed, shard_bytes=4 << 30,
                                         device=device, progress=progress)
            full_dims = False
        if full_dims:
            cfg = r1_config(num_layers or 4)
            self.model = DeepseekV3ForCausalLM.from_random(cfg, device, precision, seed, prefill_mode)
        else:
            model_dir = model_dir if model_dir is not None else ensure_default_model()
            self.model = DeepseekV3ForCausalLM.from_pretrained(model_dir, device, precision, num_layers,
                                                               progress=progress, prefill_mode=prefill_mode)
        self.load_seconds = time.perf_counter() - t0
        cfg = self.model.cfg
        if num_pages is None:
            num_pages = self._default_pages(kv_cache_fp8)
        self.cache = PagedKVCache(cfg.num_hidden_layers, num_pages, PAGE_SIZE, self.model.cache_dtype,
                                  self.model.device, fp8=kv_cache_fp8)
        runner = None
        if cuda_graphs and self.model.device.type == "cuda":
            from flashseek.engine.cuda_graph import DecodeGraphRunner
            runner = DecodeGraphRunner(self.model, self.cache, max_batch=max_num_seqs)
        self.engine = Engine(self.model, self.cache, max_num_seqs, max_num_batched_tokens, runner)

    def _default_pages(self, fp8: bool) -> int:
        cfg = self.model.cfg
        if self.model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.model.device)
            budget = int(free * 0.5)
        else:
            budget = 16384 * cfg.num_hidden_layers * 576 * torch.empty((), dtype=self.model.cache_dtype).element_size()
        return min(PagedKVCache.pages_for_budget(budget, cfg.num_hidden_layers, PAGE_SIZE, fp8, self.model.cache_dtype),
                   8192)

    def generate(self, prompt_token_ids: Union[Sequence[int], Sequence[Sequence[int]]],
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 on_token: Optional[Callable[[int, int], None]] = None) -> list[RequestOutput]:
        """Generates for one prompt (a list of ids) or several; on_token(request_index, token_id)
        streams every token as it is sampled. Returns one RequestOutput per prompt, in order."""
        if hasattr(prompt_token_ids, "tolist"):
            prompt_token_ids = prompt_token_ids.tolist()
        single = len(prompt_token_ids) > 0 and not hasattr(prompt_token_ids[0], "__len__")
        prompts = [list(prompt_token_ids)] if single else [list(p) for p in prompt_token_ids]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        reqs: list[Request] = []
        for i, (p, sp) in enumerate(zip(prompts, params)):
            cb = (lambda r, t, i=i: on_token(i, t)) if on_token is not None else None
            reqs.append(self.engine.add_request(p, sp, cb))
        self.engine.run_to_completion()
        return [RequestOutput(r.id, r.prompt, r.output, r.finish_reason, r.ttft_s, r.tpot_s) for r in reqs]

    def kv_cache_usage(self) -> dict:
        return self.cache.usage()
