"""The studio's page frame: one function that wraps a page's body in the shared layout.

Every studio page (the feedback pages included) is server-rendered HTML built with
:func:`page`: a nav bar, the shared stylesheet and, when a page asks for them, its scripts.
Bodies are trusted HTML built by the caller; anything that came from a user or a file must go
through :func:`esc` first.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

STATIC = "/studio/static"
PLOTLY = "plotly.min.js"  # served from the installed plotly package, never from a CDN

NAV = (
    ("/studio/runs", "Runs"),
    ("/studio/compare", "Compare"),
    ("/studio/data", "Data"),
    ("/studio/jobs/new", "New job"),
    ("/studio/playground", "Playground"),
    ("/studio/feedback", "Feedback"),
)


def esc(value: object) -> str:
    """``value`` as text safe inside HTML elements and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def page(title: str, body_html: str, *, scripts: Sequence[str] = ()) -> str:
    """A whole HTML page titled ``title`` around ``body_html``.

    ``scripts`` are file names under /studio/static/ (``"plotly.min.js"`` for plots,
    ``"studio.js"``, ``"feedback_label.js"``...) or absolute paths; each becomes a deferred
    script tag, in order, so a page script may use Plotly.
    """
    nav = "".join(f'<a href="{href}">{name}</a>' for href, name in NAV)
    tags = "".join(
        f'<script defer src="{esc(s if s.startswith("/") else f"{STATIC}/{s}")}"></script>'
        for s in scripts)
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · tuneforge studio</title>"
        f'<link rel="stylesheet" href="{STATIC}/studio.css">{tags}</head>'
        f'<body><nav class="top"><span class="brand">tuneforge studio</span>{nav}</nav>'
        f"<main><h1>{esc(title)}</h1>\n{body_html}\n</main></body></html>\n"
    )
