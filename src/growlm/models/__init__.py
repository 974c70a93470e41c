"""Models: the typed config, the one model file, Hugging Face / GGUF interop, embedded assets, tokenizers.

Imports nothing from growlm above it (only `growlm.errors` and `growlm.io`).
"""

from growlm.models.config import ModelConfig
from growlm.models.model import GPT, KVCache

__all__ = ["GPT", "KVCache", "ModelConfig"]
