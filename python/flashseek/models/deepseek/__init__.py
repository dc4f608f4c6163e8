"""DeepSeek-V3 / V3.1 / R1: config, checkpoint writer and loader, layers, model."""
from flashseek.models.deepseek.config import ConfigError, DeepseekConfig, r1_config, tiny_r1_config  # noqa: F401
from flashseek.models.deepseek.loader import CheckpointError, CheckpointReader  # noqa: F401
from flashseek.models.deepseek.model import DeepseekV3ForCausalLM  # noqa: F401
