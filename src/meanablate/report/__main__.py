"""``python -m meanablate.report RUN_DIR [RUN_DIR ...]``: write the report of each run folder.

``python -m meanablate.report --example DIR`` first writes the synthetic
:func:`~meanablate.report.example_results` to ``DIR/results.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meanablate.report import example_results, write_json_atomic, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m meanablate.report",
        description="Write report.html (and plots) for discovery run folders.",
    )
    parser.add_argument("run_dirs", nargs="+", type=Path, help="folders holding results.json")
    parser.add_argument(
        "--example",
        action="store_true",
        help="first write the synthetic example results.json into each folder",
    )
    args = parser.parse_args(argv)
    status = 0
    for run_dir in args.run_dirs:
        try:
            if args.example:
                run_dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(run_dir / "results.json", example_results())
            print(write_report(run_dir))
        except (OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
