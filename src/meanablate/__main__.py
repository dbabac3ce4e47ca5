"""``python -m meanablate``: the ``meanablate`` command line (see :mod:`meanablate.cli`)."""

from meanablate.cli import main

if __name__ == "__main__":
    main()
