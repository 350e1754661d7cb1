"""The browser demo (demos/web): the page at `/` and its files next to it.

Each file gets its own exact route rather than a catch-all mount at `/`, so the page cannot
shadow an API route however the install calls are ordered. The page lives in the source tree,
not the package: an installation without it serves the API alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.responses import FileResponse

if TYPE_CHECKING:
    from .app import ServerState

_LOGGER = logging.getLogger(__name__)
PAGE_DIR = Path(__file__).resolve().parents[2] / "demos" / "web"
# Revalidate on every load (the ETag makes that cheap), so an edited page shows at once.
_HEADERS = {"Cache-Control": "no-cache"}


def _route(app: FastAPI, url: str, file: Path) -> None:
    async def serve_file() -> FileResponse:
        return FileResponse(file, headers=_HEADERS)

    app.add_api_route(url, serve_file, methods=["GET"], include_in_schema=False, name=f"web:{file.name}")


def install(app: FastAPI, state: "ServerState", page_dir: Path = PAGE_DIR) -> None:
    index = page_dir / "index.html"
    if not index.is_file():
        _LOGGER.info("no web page at %s; serving the API only", page_dir)
        return
    _route(app, "/", index)
    for file in sorted(page_dir.iterdir()):
        if file.is_file() and not file.name.startswith("."):
            _route(app, f"/{file.name}", file)
