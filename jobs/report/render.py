"""The report's content as plain data, and its two renderings: report.md and index.html.

jobs/report/content.py decides what is shown; this module only lays it out,
so the page and the Markdown always say the same. index.html is one file
with its figures inlined as data: URIs and its style inline: it opens from a
local copy or straight from an object store, with no server and no network.
report.md links the same figures as PNG files beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field


@dataclass
class Fact:
    """One headline number. `key` names it in the page (data-headline) for tools and tests."""

    key: str
    label: str
    value: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # the PNG's file name, without .png
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    blocks: list[str | Table | Figure] = field(default_factory=list)  # a str is a paragraph


@dataclass
class Report:
    title: str
    notice: str | None  # what the reader must know first: running, failed, cancelled
    facts: list[Fact]
    sections: list[Section]
    footer: str

    @property
    def figures(self) -> list[Figure]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Figure)]


# -- Markdown ----------------------------------------------------------------------------------


def markdown(report: Report, figure_path) -> str:
    """report.md; `figure_path(name)` is a figure's path relative to the Markdown file."""
    lines = [f"# {report.title}", ""]
    if report.notice:
        lines += [f"> **{report.notice}**", ""]
    lines += _md_table(Table(["", ""], [[f.label, f.value] for f in report.facts]))
    for section in report.sections:
        lines += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Table):
                lines += _md_table(block)
            elif isinstance(block, Figure):
                lines += [f"![{block.caption}]({figure_path(block.name)})", ""]
            else:
                lines += [block, ""]
    lines += ["---", "", report.footer, ""]
    return "\n".join(lines)


def _md_table(table: Table) -> list[str]:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    return [
        "| " + " | ".join(cell(h) for h in table.header) + " |",
        "|" + "---|" * len(table.header),
        *("| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows),
        "",
    ]


# -- HTML --------------------------------------------------------------------------------------

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b; margin: 0;
       background: #f6f7f9; }
main { max-width: 960px; margin: 0 auto; padding: 24px; }
h1 { font-size: 24px; margin: 0 0 12px; }
h2 { font-size: 18px; margin: 28px 0 8px; border-bottom: 1px solid #d9dde3; padding-bottom: 4px; }
.notice { background: #fff4d6; border-left: 4px solid #e0a800; padding: 10px 14px; margin: 12px 0; }
.notice.failed, .notice.cancelled { background: #fde8e8; border-color: #c53030; }
.facts { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 10px; margin: 16px 0; }
.fact { background: #fff; border: 1px solid #d9dde3; border-radius: 6px; padding: 8px 12px; }
.fact .label { font-size: 12px; color: #5a6572; text-transform: uppercase; letter-spacing: .03em; }
.fact .value { font-size: 18px; font-weight: 600; overflow-wrap: anywhere; }
table { border-collapse: collapse; background: #fff; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d9dde3; padding: 4px 8px; text-align: left; vertical-align: top; }
td { white-space: pre-wrap; overflow-wrap: anywhere; max-width: 640px; }
figure { margin: 8px 0 16px; }
figure img { max-width: 100%; height: auto; background: #fff; border: 1px solid #d9dde3; }
figcaption { font-size: 13px; color: #5a6572; }
footer { color: #5a6572; font-size: 12px; margin-top: 32px; }
"""


def page(report: Report, state: str) -> str:
    """index.html: everything inline."""
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(report.title)}</title><style>{STYLE}</style></head>",
        f'<body><main data-state="{e(state)}">',
        f"<h1>{e(report.title)}</h1>",
    ]
    if report.notice:
        out.append(f'<p class="notice {e(state)}" id="notice">{e(report.notice)}</p>')
    out.append('<div class="facts">')
    for f in report.facts:
        out.append(
            f'<div class="fact"><div class="label">{e(f.label)}</div>'
            f'<div class="value" data-headline="{e(f.key)}">{e(f.value)}</div></div>'
        )
    out.append("</div>")
    for section in report.sections:
        out.append(f"<section><h2>{e(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Table):
                out.append(_html_table(block))
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode()
                out.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{e(block.caption)}" '
                    f'data-figure="{e(block.name)}"><figcaption>{e(block.caption)}</figcaption></figure>'
                )
            else:
                out.append(f"<p>{e(block)}</p>")
        out.append("</section>")
    out.append(f"<footer>{e(report.footer)}</footer></main></body></html>")
    return "\n".join(out)


def _html_table(table: Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(h))}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
