"""growlm: grow, distil and continue the pretraining of small GPT-style language models."""

from growlm.config import ModelConfig
from growlm.model import GPT, KVCache

__all__ = ["GPT", "KVCache", "ModelConfig"]
__version__ = "0.1.0"
