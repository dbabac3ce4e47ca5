"""Built-in model organisms: small transformers whose circuits are known."""

from meanablate.organisms.transformer import (
    HookedTransformer,
    HookPoint,
    TransformerConfig,
    load_model,
    save_model,
)

__all__ = ["HookPoint", "HookedTransformer", "TransformerConfig", "load_model", "save_model"]
