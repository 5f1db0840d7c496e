"""flashjax: run language models whose FFN weights stay on flash, the "LLM in a flash" way."""

from flashjax.api import load
from flashjax.config import ConfigError, LlamaConfig, ModelConfig, OPTConfig
from flashjax.store.bundles import StoreError
from flashjax.store.convert import convert
from flashjax.store.hf import CheckpointError
from flashjax.store.place import place_store as place
from flashjax.store.requantize import quantize_store as quantize

__version__ = "0.1.0"
__all__ = ["load", "convert", "quantize", "place", "ModelConfig", "OPTConfig", "LlamaConfig", "ConfigError",
           "CheckpointError", "StoreError"]
