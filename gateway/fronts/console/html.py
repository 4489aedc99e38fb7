"""The console's HTML: one layout, escaping everywhere, and headers that keep pages to themselves.

Every value from a record, a tool server, an agent or a caller goes through `esc` (text and
attribute context alike). Pages load only Bastion's own stylesheet (inline, allowed by hash) and
its one script (`/console/static/console.js`); the CSP forbids everything else, framing included.
"""

from __future__ import annotations

import base64
import hashlib
import html
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:0;color:#1d2330}"
    "header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}"
    "header a{color:#cfd8ea;text-decoration:none}header a.on{color:#fff;font-weight:bold}"
    "header form{margin-left:auto}main{padding:1em 1.2em;max-width:90em}"
    "table{border-collapse:collapse;width:100%}th,td{text-align:left;padding:.25em .6em;"
    "border-bottom:1px solid #e3e6ec;vertical-align:top;font-size:.92em}"
    "th{background:#f4f6f9}pre{background:#f4f6f9;padding:.8em;overflow:auto;white-space:pre-wrap;"
    "word-break:break-all}.deny{color:#a4161a}.allow{color:#1b7f3b}.warn{color:#a15c00}"
    ".muted{color:#6b7280}form.filters{display:flex;flex-wrap:wrap;gap:.5em;margin-bottom:1em}"
    "form.filters label{display:flex;flex-direction:column;font-size:.8em}.cards{display:flex;"
    "flex-wrap:wrap;gap:1em}.card{border:1px solid #e3e6ec;border-radius:6px;padding:.8em;min-width:16em}"
    ".who{margin-left:auto}code{background:#f4f6f9;padding:0 .2em}"
    ".diff-del{background:#fde2e2}.diff-add{background:#dcfce7}"
)
_STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()
HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; style-src 'sha256-{_STYLE_HASH}'; script-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}
NAV = (
    ("/console", "Overview"),
    ("/console/audit", "Audit"),
    ("/console/approvals", "Approvals"),
    ("/console/tools", "Tools"),
    ("/console/policy", "Policy"),
    ("/console/budgets", "Budgets"),
)


def esc(value: Any) -> str:
    """Text for HTML text or a quoted attribute: `& < > " '` escaped, None as an empty string."""
    return "" if value is None else html.escape(str(value), quote=True)


def link(path: str, text: Any, **query: Any) -> str:
    q = {k: v for k, v in query.items() if v not in (None, "")}
    href = path + ("?" + urlencode(q) if q else "")
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "none", **attrs: str) -> str:
    """Cells are HTML already (escape values with `esc` when building them)."""
    extra = "".join(f' {k.replace("_", "-")}="{esc(v)}"' for k, v in attrs.items())
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        body = f'<tr><td colspan="{len(headers)}" class="muted">{esc(empty)}</td></tr>'
    return f"<table{extra}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def hidden_token(token: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(token)}">' if token else ""


@dataclass(frozen=True, slots=True)
class Page:
    title: str
    body: str
    """HTML, every value in it escaped."""
    active: str = ""
    """The nav entry to highlight."""
    script: bool = False
    """Whether the page needs `console.js` (the live tail)."""
    status: int = 200


def document(title: str, body: str, active: str, user: str, form_token: str, script: bool = False) -> str:
    nav = "".join(f'<a href="{p}"{" class=on" if p == active else ""}>{esc(t)}</a>' for p, t in NAV)
    logout = (
        f'<form method="post" action="/console/logout">{hidden_token(form_token)}'
        f'<span class="muted">{esc(user)}</span> <button type="submit">Log out</button></form>'
        if form_token
        else f'<span class="muted who">{esc(user)}</span>'
    )
    js = '<script src="/console/static/console.js" defer></script>' if script else ""
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(title)} · Bastion</title><style>{STYLE}</style>{js}</head>"
        f"<body><header><strong>Bastion</strong>{nav}{logout}</header>"
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )
