"""Built-in model organisms: small transformers whose circuits are known."""

from meanablate.organisms.registry import Organism, load, names
from meanablate.organisms.tracr_program import from_tracr
from meanablate.organisms.transformer import (
    HookedTransformer,
    HookPoint,
    TransformerConfig,
    load_model,
    save_model,
)

__all__ = [
    "HookPoint",
    "HookedTransformer",
    "Organism",
    "TransformerConfig",
    "from_tracr",
    "load",
    "load_model",
    "names",
    "save_model",
]
