"""GET /playground: a browser page that watches an answer sharpen out of the masks.

    add_playground(app, service)   # build_openai_app does it when args.ingress.playground

The page (deployments/static/: plain HTML, JavaScript and CSS, no build step, nothing fetched
from outside, so it works offline) is a client of this server's own OpenAI API: it lists
/v1/models, streams one request with `diffusing: true` and draws every canvas (masked positions
as glyphs, the text committed at that step highlighted), then shows the steps per block the
router chose, forward passes, tokens per pass, time to first token and tok/s from the stream's
usage. A side panel polls GET /health once a second: replicas, queued tokens, drain time and
the router's current rung, to watch it degrade and restore under load.

Auth: the page and its two assets are public, the API behind them is not. A browser cannot
send an Authorization header when it navigates to a URL, so a keyed /playground could only be
opened by a script; and the page holds nothing but static code (no model output, no settings,
only whether a key is needed, which a 401 from /v1/models tells anyone anyway). With keys set,
the page asks for one, keeps it in sessionStorage (gone when the tab closes) and sends it as
`Authorization: Bearer` on every /v1 call, which the ingress' middleware checks as for any
client; without it the page can list and generate nothing. /health is public already.

Every response carries a Content-Security-Policy that allows only this origin's scripts,
styles and fetches (no inline script, no framing), and the page writes model output with
textContent only: output cannot become markup.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from deployments.errors import APIError

STATIC_DIR = Path(__file__).with_name("static")
PAGE = "playground.html"
ASSETS = {"playground.js": "text/javascript; charset=utf-8",
          "playground.css": "text/css; charset=utf-8"}
# 'self' everywhere the page needs it and nothing else; data: only for the empty favicon
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
           "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def add_playground(app: FastAPI, service) -> None:
    """Add GET /playground (the page) and GET /playground/<asset> to the API's app."""
    page = (STATIC_DIR / PAGE).read_text(encoding="utf-8")
    # the page styles its key field as required before the first 401 says so
    page = page.replace("__AUTH__", "required" if service.api_keys else "open").encode()
    assets = {name: (STATIC_DIR / name).read_bytes() for name in ASSETS}

    @app.get("/playground", include_in_schema=False)
    async def playground_page():
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    @app.get("/playground/{name}", include_in_schema=False)
    async def playground_asset(name: str):
        if name not in assets:
            raise APIError(404, f"no route GET /playground/{name}", code="not_found")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)
