"""Your own PyTorch model on the command line: a toy MLP with a planted circuit.

The hidden layer has 16 neurons; the output reads only neurons 0-3 (the planted circuit),
so mean-ablating any other neuron changes nothing. Run::

    meanablate discover --model examples/custom_model.py:build
    meanablate discover --config examples/custom_model.toml

``build`` may take any of ``n_examples``, ``batch_size`` and ``seed`` (the command passes
its options) and returns ``(model, batches)``, ``(model, batches, units)``, or a dict with
``model``, ``batches`` and optionally ``units``, ``metric``, ``ground_truth`` and
``per_position``. Batches are dicts of tensors: keys the model's ``forward`` accepts go in
(here ``x``); task fields (``target``, ``wrong``, ``target_value``) go to the metric.
"""

import torch
from torch import nn

N_HIDDEN = 16
CIRCUIT = [0, 1, 2, 3]


class PlantedMLP(nn.Module):
    """``x [batch, 8] -> hidden [batch, 16] -> logits [batch, 5]``; only 4 neurons matter."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(8, N_HIDDEN)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(N_HIDDEN, 5)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.randn(N_HIDDEN, 8, generator=gen))
            mask = torch.zeros(N_HIDDEN)
            mask[CIRCUIT] = 1.0
            self.fc2.weight.copy_(torch.randn(5, N_HIDDEN, generator=gen) * mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def build(n_examples: int = 256, batch_size: int = 64, seed: int = 0) -> dict:
    """A toy MLP whose output reads only hidden neurons 0-3; task: its own argmax."""
    model = PlantedMLP().eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_examples, 8, generator=gen)
    with torch.no_grad():
        target = model(x).argmax(-1)  # the metric "loss" scores the model's own answers
    batches = [
        {"x": x[i : i + batch_size], "target": target[i : i + batch_size]}
        for i in range(0, n_examples, batch_size)
    ]
    return {
        "model": model,
        "batches": batches,
        "units": [f"act[neurons={i}]" for i in range(N_HIDDEN)],
        "metric": "loss",
        "ground_truth": [f"act[neurons={i}]" for i in CIRCUIT],
    }


if __name__ == "__main__":
    out = build()
    print(type(out["model"]).__name__, len(out["batches"]), "batches,", len(out["units"]), "units")
