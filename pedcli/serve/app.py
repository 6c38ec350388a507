"""The web layer of `ped serve` (Starlette): the page, its JSON API, thumbnails by catalogue id.

Routes:
    GET /                      the search page (static HTML; every string is put in by the script as text)
    GET /api/info              header: gallery size, method, run metrics, sync progress
    GET /api/search?q=&top=&min_score=   `ped query --json` fields, plus each result's id, name and view
    GET /api/similar/<id>?top= images closest to image <id> (cosine of the global features)
    GET /image/<id>            a JPEG thumbnail of gallery image <id>; ids only, never a path
    GET /static/...            the page's script and style sheet

Safety: with a token, every request must carry it (`?token=`, an `Authorization: Bearer` header, or the
cookie the page gets on its first authorised load); responses forbid inline scripts and other origins
(Content-Security-Policy), so an escaped-by-mistake string still could not run.
"""

from __future__ import annotations

import hmac
import re
from functools import lru_cache
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pedcli.engine.search.report import thumbnail_jpeg
from pedcli.errors import PedError
from pedcli.serve.service import SearchService

STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "ped_token"
ID_PATTERN = re.compile(r"[0-9a-f]{16}")
THUMB_CACHE = 4096
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _error(status: int, message: str, hint: str = "") -> JSONResponse:
    return JSONResponse({"error": message, "fix": hint}, status_code=status)


def _not_ready(service: SearchService) -> JSONResponse:
    """Before the first sync has finished: still running (503), or failed (500, with why)."""
    if service.state.error:
        return _error(
            500, f"indexing the gallery failed: {service.state.error}", "fix it and restart ped serve"
        )
    return _error(503, "the gallery is still being indexed", "wait for the progress bar to finish")


class Guard(BaseHTTPMiddleware):
    """The token check (when the server has one) and the security headers, on every response."""

    def __init__(self, app: object, token: str | None) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.token = token

    def _authorised(self, request: Request) -> tuple[bool, bool]:
        """(authorised, from the URL): a token in the URL is turned into a cookie for the page's requests."""
        if self.token is None:
            return True, False
        header = request.headers.get("authorization", "")
        given = [
            (request.query_params.get("token"), True),
            (header[7:] if header.lower().startswith("bearer ") else None, False),
            (request.cookies.get(TOKEN_COOKIE), False),
        ]
        for value, from_url in given:
            if value is not None and hmac.compare_digest(value.encode(), self.token.encode()):
                return True, from_url
        return False, False

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        ok, from_url = self._authorised(request)
        if not ok:
            response: Response = _error(401, "missing or wrong token", "open the URL `ped serve` printed")
        else:
            response = await call_next(request)
            if from_url:
                response.set_cookie(TOKEN_COOKIE, self.token or "", httponly=True, samesite="strict")
        for k, v in HEADERS.items():
            response.headers.setdefault(k, v)
        return response


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise PedError(f"{name} must be a whole number, not {raw!r}") from None


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw in (None, ""):
        return None
    try:
        return float(raw)
    except ValueError:
        raise PedError(f"{name} must be a number, not {raw!r}") from None


def create_app(service: SearchService, token: str | None = None) -> Starlette:
    """The ASGI app over a loaded `SearchService` (the caller starts the first sync)."""

    @lru_cache(maxsize=THUMB_CACHE)
    def thumbnail(path: Path, mtime_ns: int) -> bytes:  # keyed by mtime: an edited file gets a new one
        return thumbnail_jpeg(path)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    async def search(request: Request) -> Response:
        if not service.state.synced:
            return _not_ready(service)
        try:
            q = request.query_params.get("q", "")
            args = (q, _int(request, "top", 10), _float(request, "min_score"))
            return JSONResponse(await run_in_threadpool(service.search, *args))
        except PedError as e:
            return _error(400, e.message, e.hint or "")

    async def similar(request: Request) -> Response:
        image_id = request.path_params["image_id"]
        if not ID_PATTERN.fullmatch(image_id):
            return _error(404, "no such image", "use an id from /api/search")
        if not service.state.synced:
            return _not_ready(service)
        try:
            return JSONResponse(await run_in_threadpool(service.similar, image_id, _int(request, "top", 10)))
        except KeyError:
            return _error(404, "no such image", "the file was removed; search again")
        except PedError as e:
            return _error(400, e.message, e.hint or "")

    async def image(request: Request) -> Response:
        image_id = request.path_params["image_id"]
        path = service.image_path(image_id) if ID_PATTERN.fullmatch(image_id) else None
        if path is None:
            return _error(404, "no such image", "use an id from /api/search")
        try:
            data = await run_in_threadpool(thumbnail, path, path.stat().st_mtime_ns)
        except OSError:
            return _error(404, "the image can no longer be read", "search again")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    routes = [
        Route("/", page),
        Route("/api/info", info),
        Route("/api/search", search),
        Route("/api/similar/{image_id}", similar),
        Route("/image/{image_id}", image),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes, middleware=[Middleware(Guard, token=token)])
