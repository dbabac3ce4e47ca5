"""Helpers for models from other libraries (import the submodule you need).

This package imports nothing on purpose: ``meanablate.adapters.huggingface`` needs
``transformers`` only when one of its functions that talks to a tokenizer or a model
is called.
"""
