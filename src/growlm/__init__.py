"""growlm: grow, distil and continue the pretraining of small GPT-style language models.

The public API::

    import growlm
    model, tok = growlm.load("smollm2-135m")                       # GGUF / HF dir / growlm dir / hub id
    res = growlm.grow(model, growlm.GrowthSpec("depth", n=2))       # function-preserving; res.model
    result = growlm.train(growlm.TrainConfig(...))                  # continued pretraining with growth
    scores = growlm.evaluate(model, tok, ["hellaswag"], data_dir)   # lm-evaluation-harness scoring
    growlm.perplexity(model, tok, text)                             # token/word/byte perplexity, bits per byte

Layers (imports point down only): `models` <- `growth`, `eval` <- `train` <- `cli`.
"""

from growlm.errors import GrowlmError
from growlm.eval import evaluate, perplexity
from growlm.growth import GrowthSpec, grow, grow_many
from growlm.models import GPT, KVCache, ModelConfig
from growlm.models.hf import load_model as load
from growlm.models.hf import save_hf
from growlm.train import TrainConfig, Trainer, train

__all__ = ["GPT", "GrowlmError", "GrowthSpec", "KVCache", "ModelConfig", "TrainConfig", "Trainer", "evaluate",
           "grow", "grow_many", "load", "perplexity", "save_hf", "train"]
__version__ = "0.1.0"
