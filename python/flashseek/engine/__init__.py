"""Inference engine: paged latent KV cache, continuous batching, sampling, the LLM API."""
from flashseek.engine.sampling import SamplingParams  # noqa: F401


def __getattr__(name):
    if name == "LLM":
        from flashseek.engine.llm import LLM
        return LLM
    raise AttributeError(name)
