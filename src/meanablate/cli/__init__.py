"""The ``meanablate`` command: a demo, the built-in organisms, and your own models.

::

    meanablate demo                              # tracr-sort: circuit, faithfulness, AUROC
    meanablate demo --organism tracr-reverse
    meanablate organisms                         # the built-in models, tasks, ground truths
    meanablate discover --model gpt2-dir --prompts prompts.jsonl --units heads
    meanablate discover --model mymodels:build --config run.toml
    meanablate report runs/tracr-sort-20250101-120000

Every run option is a flag and a key of a TOML config file (``--config FILE``; flags win;
see :mod:`meanablate.config`). Logs and progress bars go to stderr, results to files in the
run folder; ``-q`` silences them and transformers'/TransformerLens' own. Bad input prints one
line on stderr and exits with code 2 (``--debug`` shows the traceback; docs/errors.md); Ctrl-C
exits with 130 and never leaves a half-written ``results.json``. An ``--out`` folder that
already holds a run is not written into without ``--force``.

Modules: :mod:`~meanablate.cli.app` (the commands), :mod:`~meanablate.cli.options` (their
flags), :mod:`~meanablate.cli.errors` (one-line errors, exit codes),
:mod:`~meanablate.cli.runs` (what the run commands do), :mod:`~meanablate.cli.inputs` (models,
data and units from the options: :mod:`~meanablate.cli.organism`, :mod:`~meanablate.cli.hf`,
:mod:`~meanablate.cli.prompts`, :mod:`~meanablate.cli.custom`, :mod:`~meanablate.cli.units`),
:mod:`~meanablate.cli.executor` (``--ray``), :mod:`~meanablate.cli.pipeline` (means, sweep,
discovery, scores, the run folder), :mod:`~meanablate.cli.tables` (what is printed).
"""

from meanablate.cli.app import app, main

__all__ = ["app", "main"]
