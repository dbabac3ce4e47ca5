"""MkDocs hook: docstring examples (``>>>`` doctest blocks) render as code.

Docstrings here use plain doctest blocks (they run as tests); Markdown would read them as
paragraphs. A small Markdown preprocessor fences each block as ``pycon``, for the pages and
for the docstrings mkdocstrings renders (it reuses the site's Markdown extensions).
"""

from __future__ import annotations

import re

from markdown import Extension
from markdown.preprocessors import Preprocessor
from mkdocs.plugins import event_priority

_PROMPT = re.compile(r"^(\s*)>>> ")


class _DoctestFences(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        out: list[str] = []
        i, fenced = 0, False
        while i < len(lines):
            line = lines[i]
            if line.lstrip().startswith(("```", "~~~")):
                fenced = not fenced
            m = None if fenced else _PROMPT.match(line)
            if m is None:
                out.append(line)
                i += 1
                continue
            indent = m.group(1)
            block = []
            while i < len(lines) and lines[i].strip() and lines[i].startswith(indent):
                block.append(lines[i][len(indent) :])
                i += 1
            out += ["", indent + "```pycon", *(indent + b for b in block), indent + "```", ""]
        return out


class DoctestFences(Extension):
    def extendMarkdown(self, md):  # noqa: N802  (Markdown's API)
        md.preprocessors.register(_DoctestFences(md), "doctest_fences", 40)


@event_priority(100)  # before mkdocstrings reads the extensions
def on_config(config):
    config.markdown_extensions.append(DoctestFences())
    return config
