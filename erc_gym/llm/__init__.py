"""The LLM side of erc_gym: a GRPO / DAPO / GPPO (+ERC) trainer for transformers causal LMs."""

from erc_gym.llm.model import load_model_and_tokenizer, make_tiny_lm, sft_warmstart
from erc_gym.llm.trainer import METRIC_KEYS, PRESETS, ERCTrainer, TrainerConfig

__all__ = [
    "METRIC_KEYS",
    "PRESETS",
    "ERCTrainer",
    "TrainerConfig",
    "load_model_and_tokenizer",
    "make_tiny_lm",
    "sft_warmstart",
]
