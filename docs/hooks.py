"""mkdocs hooks: the committed figures as site files, and display math that sits inside a paragraph.

- ``on_files``: figures/*.png at the repository root (where the experiment scripts write them) become the
  site files figures/NAME.png, so a clean clone builds the gallery without a copy step.
- ``on_page_markdown``: docs/THEORY.md writes display math as a ``$$ ... $$`` line (or lines) inside a
  paragraph; pymdownx.arithmatex renders ``$$`` only as a block of its own, so each such span is set
  apart by blank lines for the build; and arithmatex reads ``$...$`` as inline math only when no space
  touches the inner side of a dollar, so the spaces at the end of a span such as ``$1 - $stay`` are dropped
  (the source file is unchanged).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

FIGURES = Path(__file__).resolve().parents[1] / "figures"
DISPLAY_MATH = re.compile(r"^\$\$.+?\$\$[ \t]*$", re.MULTILINE | re.DOTALL)
FENCED_CODE = re.compile(r"(^[ \t]*```.*?^[ \t]*```[^\n]*$)", re.MULTILINE | re.DOTALL)
PARAGRAPH_BREAK = re.compile(r"(\n[ \t]*\n)")
CODE_OR_DOLLAR = re.compile(r"`+[^`]*`+|\$")


def on_files(files, config):
    for png in sorted(FIGURES.glob("*.png")):
        files.append(File.generated(config, f"figures/{png.name}", abs_src_path=str(png)))
    return files


def _trim_inline_math(paragraph: str) -> str:
    """Pair the dollars of one paragraph (outside code spans) in order; drop trailing spaces inside each pair."""
    if "$$" in paragraph:
        return paragraph
    dollars = [m.start() for m in CODE_OR_DOLLAR.finditer(paragraph) if m.group(0) == "$"]
    if len(dollars) % 2:
        return paragraph
    out, last = [], 0
    for open_, close in zip(dollars[::2], dollars[1::2]):
        inner = paragraph[open_ + 1 : close]
        out += [paragraph[last : open_ + 1], inner.rstrip() if inner.strip() else inner]
        last = close
    return "".join(out) + paragraph[last:]


def _prepare_math(text: str) -> str:
    text = DISPLAY_MATH.sub(lambda m: f"\n{m.group(0)}\n", text)
    return "".join(_trim_inline_math(part) for part in PARAGRAPH_BREAK.split(text))


def on_page_markdown(markdown, page, config, files):
    parts = FENCED_CODE.split(markdown)  # odd entries are fenced code blocks, left alone
    return "".join(part if index % 2 else _prepare_math(part) for index, part in enumerate(parts))
