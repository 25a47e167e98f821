"""The evaluation report: one list of blocks, rendered to report.md (images beside it) and to a
self-contained report.html (images embedded), the form MLflow's and KFP's UIs display."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

from cnnpipe.evaluation.folder import REPORT_HTML, REPORT_MD


@dataclass
class Report:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def text(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list], folded: str | None = None) -> None:
        """`folded`: the HTML shows the table closed under this summary (a long table of details)."""
        self.blocks.append(("table", header, [[_fmt(v) for v in row] for row in rows], folded))

    def image(self, file: str, caption: str) -> None:
        self.blocks.append(("img", file, caption))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            if b[0] == "h2":
                out += [f"## {b[1]}", ""]
            elif b[0] == "p":
                out += [b[1], ""]
            elif b[0] == "table":
                out += ["| " + " | ".join(b[1]) + " |", "|" + " --- |" * len(b[1])]
                out += ["| " + " | ".join(r) + " |" for r in b[2]] + [""]
            else:
                out += [f"![{b[2]}]({b[1]})", "", f"*{b[2]}*", ""]
        return "\n".join(out)

    def html(self, folder: Path) -> str:
        parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(self.title)}</title>",
                 "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}th{background:#f3f3f3}td:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{color:#555;font-style:italic}</style>", f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            if b[0] == "h2":
                parts.append(f"<h2>{html.escape(b[1])}</h2>")
            elif b[0] == "p":
                parts.append(f"<p>{html.escape(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{html.escape(h)}</th>" for h in b[1])
                body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in b[2])
                table = f"<table><tr>{head}</tr>{body}</table>"
                parts.append(f"<details><summary>{html.escape(b[3])}</summary>{table}</details>" if b[3] else table)
            else:
                data = base64.b64encode((folder / b[1]).read_bytes()).decode()
                parts.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(b[2])}'>"
                             f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return "\n".join(parts) + "\n"

    def write(self, folder: Path) -> None:
        (folder / REPORT_MD).write_text(self.markdown() + "\n")
        (folder / REPORT_HTML).write_text(self.html(folder))


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
