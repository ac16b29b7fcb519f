"""A tiny document model (sections of paragraphs, notes, tables and figures) and its two renderings.

The report is built once as a `Document` and rendered twice, so the Markdown and the HTML page
always say the same thing:

    to_markdown(doc) -> report.md, figures referenced as files beside it
    to_html(doc)     -> report.html, one self-contained page: CSS inline, figures as data: URIs,
                        and a Content-Security-Policy that forbids every other request
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from typing import Union


@dataclass
class Cell:
    text: str
    bold: bool = False
    numeric: bool = False  # right-aligned in HTML


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Figure:
    filename: str  # written beside report.md
    png: bytes
    alt: str
    caption: str = ""


@dataclass
class Paragraph:
    text: str


@dataclass
class Note:
    """A one-line remark in italics, e.g. why a section is missing."""

    text: str


@dataclass
class Bullets:
    items: list[str]


Block = Union[Paragraph, Note, Bullets, Table, Figure]


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)
    level: int = 2

    @property
    def anchor(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.title.lower()).strip("-") or "section"


@dataclass
class Document:
    title: str
    intro: list[Block] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def figures(self) -> list[Figure]:
        blocks = list(self.intro) + [b for s in self.sections for b in s.blocks]
        return [b for b in blocks if isinstance(b, Figure)]


# ----------------------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|#])")


def md_escape(text: str) -> str:
    """Literal text in Markdown: markup characters backslash-escaped, and no raw HTML (< > & as entities)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return _MD_SPECIAL.sub(r"\\\1", text).replace("\n", " ")


def to_markdown(doc: Document) -> str:
    out = [f"# {md_escape(doc.title)}", ""]
    for block in doc.intro:
        out += _md_block(block)
    for section in doc.sections:
        out += ["#" * section.level + " " + md_escape(section.title), ""]
        for block in section.blocks:
            out += _md_block(block)
    return "\n".join(out).rstrip() + "\n"


def _md_block(block: Block) -> list[str]:
    if isinstance(block, Paragraph):
        return [md_escape(block.text), ""]
    if isinstance(block, Note):
        return [f"*{md_escape(block.text)}*", ""]
    if isinstance(block, Bullets):
        return [f"- {md_escape(item)}" for item in block.items] + [""]
    if isinstance(block, Figure):
        lines = [f"![{md_escape(block.alt)}]({block.filename})", ""]
        if block.caption:
            lines += [f"*{md_escape(block.caption)}*", ""]
        return lines
    if isinstance(block, Table):
        def cell(c: Cell) -> str:
            text = md_escape(c.text)
            return f"**{text}**" if c.bold and text else text

        lines = ["| " + " | ".join(md_escape(h) for h in block.headers) + " |",
                 "|" + "|".join("---:" if _numeric_column(block, i) else "---" for i in range(len(block.headers))) + "|"]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block.rows]
        lines.append("")
        if block.caption:
            lines += [f"*{md_escape(block.caption)}*", ""]
        return lines
    raise TypeError(f"unknown block {type(block).__name__}")


def _numeric_column(table: Table, i: int) -> bool:
    cells = [row[i] for row in table.rows if i < len(row)]
    return bool(cells) and all(c.numeric or c.text in ("", "n/a", "—") for c in cells) and any(c.numeric for c in cells)


# ----------------------------------------------------------------------------- HTML

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_CSS = """
:root { color-scheme: light; --ink: #1d2330; --muted: #5b6472; --rule: #d8dde6; --band: #f5f7fa; --accent: #2c5fa8; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", Arial, sans-serif; color: var(--ink); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 8px 0 4px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--rule); }
h3 { font-size: 16px; margin: 24px 0 8px; }
p { margin: 8px 0; }
p.note { color: var(--muted); font-style: italic; }
nav.toc { margin: 12px 0 8px; padding: 10px 14px; background: var(--band); border-radius: 6px; font-size: 14px; }
nav.toc a { color: var(--accent); text-decoration: none; margin-right: 14px; white-space: nowrap; display: inline-block; }
ul { margin: 6px 0; padding-left: 22px; }
.table-wrap { overflow-x: auto; margin: 10px 0 4px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid var(--rule); padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: var(--band); font-weight: 600; vertical-align: bottom; min-width: 4.5em; }
td:first-child { white-space: nowrap; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
tbody tr:nth-child(even) td { background: #fbfcfd; }
td strong { color: #0b3d91; }
.caption { color: var(--muted); font-size: 13px; margin: 2px 0 12px; }
figure { margin: 14px 0 18px; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--rule); border-radius: 4px; }
figcaption { color: var(--muted); font-size: 13px; margin-top: 4px; }
"""


def h(text: str) -> str:
    """Escape text for HTML element content and attribute values."""
    return html.escape(text, quote=True)


def to_html(doc: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{h(doc.title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{h(doc.title)}</h1>",
    ]
    for block in doc.intro:
        parts.append(_html_block(block))
    anchors, used = [], {}
    for section in doc.sections:  # unique ids, so every table-of-contents link lands on its own section
        anchor = section.anchor
        used[anchor] = used.get(anchor, 0) + 1
        anchors.append(anchor if used[anchor] == 1 else f"{anchor}-{used[anchor]}")
    top = [(s, a) for s, a in zip(doc.sections, anchors) if s.level == 2]
    if len(top) > 1:
        links = "".join(f'<a href="#{h(a)}">{h(s.title)}</a>' for s, a in top)
        parts.append(f'<nav class="toc">{links}</nav>')
    for section, anchor in zip(doc.sections, anchors):
        parts.append(f'<h{section.level} id="{h(anchor)}">{h(section.title)}</h{section.level}>')
        parts += [_html_block(block) for block in section.blocks]
    parts += ["</main>", "</body>", "</html>", ""]
    return "\n".join(parts)


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{h(block.text)}</p>"
    if isinstance(block, Note):
        return f'<p class="note">{h(block.text)}</p>'
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{h(item)}</li>" for item in block.items) + "</ul>"
    if isinstance(block, Figure):
        data = base64.b64encode(block.png).decode("ascii")
        caption = f"<figcaption>{h(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure><img src="data:image/png;base64,{data}" alt="{h(block.alt)}">{caption}</figure>'
    if isinstance(block, Table):
        numeric = [_numeric_column(block, i) for i in range(len(block.headers))]
        head = "".join(('<th class="num">' if numeric[i] else "<th>") + f"{h(t)}</th>" for i, t in enumerate(block.headers))
        body = []
        for row in block.rows:
            cells = []
            for c in row:
                text = f"<strong>{h(c.text)}</strong>" if c.bold and c.text else h(c.text)
                right = c.numeric or (numeric[len(cells)] if len(cells) < len(numeric) else False)
                cells.append(f'<td class="num">{text}</td>' if right else f"<td>{text}</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        caption = f'<p class="caption">{h(block.caption)}</p>' if block.caption else ""
        return (f'<div class="table-wrap"><table><thead><tr>{head}</tr></thead>'
                f'<tbody>{"".join(body)}</tbody></table></div>{caption}')
    raise TypeError(f"unknown block {type(block).__name__}")
