"""meanablate: mean ablation and circuit discovery for PyTorch models.

The seed API works on lists, numpy arrays and tensors of any leading shape::

    >>> import meanablate as ma
    >>> ma.mean_ablation([[1.0, 2.0]], [0.5, 0.25], [1])
    [[1.0, 0.25]]
    >>> ma.compute_ablation_effect([1.0, 2.0], [1.0, 0.25])
    1.75
"""

from meanablate.core import compute_ablation_effect, mean_ablation, replace_where

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "compute_ablation_effect",
    "mean_ablation",
    "replace_where",
]
