"""Batches for the API and the CLI: prompts with answers (:func:`prompt_batches`), one
batch or many (:func:`as_batches`), and token batches streamed from files larger than
memory: JSONL, plain text, HF datasets.

:func:`stream_batches` reads a file lazily and yields padded dict batches::

    {"input_ids": [batch, pos] long, "attention_mask": [batch, pos] long, **fields}

``meanablate.run_model`` hands ``input_ids`` to a model whose ``forward`` takes ``tokens``
(the built-in organisms); ``ids_key=`` names the key otherwise.

ready for :func:`meanablate.compute_means` (padding is excluded from the means). Sources:

- a ``.jsonl`` file: one JSON object per line with a text field (``text_field``) and,
  optionally, the fields the metrics need (``fields=("target", "wrong")``);
- a plain text file: one prompt per line;
- a directory written by ``datasets.Dataset.save_to_disk``: memory-mapped by
  ``datasets.load_from_disk`` and read in slices, never whole.

Blank lines are skipped. Only one batch is held at a time, so peak memory does not grow with
the file. ``source.shard(i, k)`` is the ``i``-th of ``k`` disjoint parts (a byte range of
the file, whole lines only; a contiguous slice of the dataset), so that each Ray worker
reads only its own part; the ``k`` shards together hold every line exactly once.

The tokenizer is either a callable ``text -> token ids`` or a Hugging Face tokenizer
(called on the whole batch of texts). Sources pickle small (path, options, tokenizer), which
is what a :class:`meanablate.executors.RayExecutor` sends to its workers.

Modules: :mod:`~meanablate.data.sources` (reading records), :mod:`~meanablate.data.batching`
(tokenizing and padding), :mod:`~meanablate.data.shards` (disjoint parts of a source),
:mod:`~meanablate.data.stream` (:class:`TextBatches`, :func:`stream_batches`).
"""

from meanablate.data.batching import DEFAULT_FIELD_PAD, batch_records
from meanablate.data.normalize import as_batches
from meanablate.data.prompts import corrupt_source, prompt_batches, read_prompts
from meanablate.data.shards import shard_iterable
from meanablate.data.sources import Record, read_hf_dataset, read_jsonl, read_text
from meanablate.data.stream import TextBatches, stream_batches

__all__ = [
    "DEFAULT_FIELD_PAD",
    "Record",
    "TextBatches",
    "as_batches",
    "batch_records",
    "corrupt_source",
    "prompt_batches",
    "read_hf_dataset",
    "read_jsonl",
    "read_prompts",
    "read_text",
    "shard_iterable",
    "stream_batches",
]
