"""jaxscale models: decoder Transformer, attention, generation and Hugging Face interop."""

from models.config import RopeScaling, TransformerConfig
from models.generate import generate, left_pad
from models.transformer import Block, KVCache, Transformer
from parallel.autodiff import plain_autodiff

__all__ = ["Block", "KVCache", "RopeScaling", "Transformer", "TransformerConfig", "generate", "left_pad",
           "plain_autodiff"]
