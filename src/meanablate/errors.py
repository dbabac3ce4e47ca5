"""The exception types meanablate raises for bad input (the contract is in docs/errors.md).

Bad input is always a ``ValueError``, ``TypeError`` or ``IndexError`` (or a subclass):
``except ValueError`` keeps working. The classes here add a common base,
:class:`MeanAblateError`, and also subclass the builtin that an existing caller would
catch, so they refine the builtin contract and never break it:

====================  ===========================================  =========================
class                 raised for                                   also an instance of
====================  ===========================================  =========================
MeansFileError        an unreadable/corrupt/foreign means file     ValueError
MissingSiteError      a site absent from the means or the model    KeyError, ValueError
UnrepresentableValue  a fill the activation's dtype cannot hold    ValueError, TypeError
NumericOverflow       a result too large for a float               ValueError, OverflowError
NoBehaviourError      full model ~ empty circuit: nothing to find  ValueError
====================  ===========================================  =========================

>>> import numpy as np
>>> import meanablate as ma
>>> try:
...     ma.mean_ablation(np.zeros((1, 2), dtype=np.uint8), [0, 300], [1])
... except ValueError as exc:
...     print(type(exc).__name__, isinstance(exc, TypeError))
UnrepresentableValueError True
"""

from __future__ import annotations

__all__ = [
    "MeanAblateError",
    "MeansFileError",
    "MissingSiteError",
    "NoBehaviourError",
    "NumericOverflowError",
    "UnrepresentableValueError",
]


class MeanAblateError(Exception):
    """Base of the exception classes meanablate defines (each also a builtin error)."""


class MeansFileError(MeanAblateError, ValueError):
    """A means file that cannot be read as meanablate means; ``.path`` is the file.

    Raised for a missing, truncated or corrupted file, a file of another format (a pickle
    or a ``torch.save`` archive renamed ``.safetensors``: never unpickled) and bad metadata.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        super().__init__(f"means file {self.path}: {problem}")


class MissingSiteError(MeanAblateError, KeyError, ValueError):
    """A site that the means (or the model) do not have; ``.site`` is its key.

    A ``KeyError`` (a lookup that failed) and a ``ValueError`` (bad input), so that both
    ``except KeyError`` and the documented ``except ValueError`` catch it.
    """

    def __init__(self, site: str, message: str) -> None:
        self.site = site
        super().__init__(message)

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class UnrepresentableValueError(MeanAblateError, ValueError, TypeError):
    """A value that an array's dtype cannot hold exactly (NaN into int, 300 into uint8).

    Both a ``ValueError`` and a ``TypeError``: the value is wrong for the type.
    """


class NumericOverflowError(MeanAblateError, ValueError, OverflowError):
    """A number too large for the float arithmetic it must go through."""


class NoBehaviourError(MeanAblateError, ValueError):
    """Discovery refused: the full model is not distinguishable from the empty circuit on
    this data and metric (``force=True``, CLI ``--force``, discovers anyway)."""
