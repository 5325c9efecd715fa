"""/metrics in the web app (``cdc-hooks web`` and ``run --web``): the Prometheus
exposition of cdc_hooks.metrics, behind the API's Bearer token unless
``[web] metrics_public = true``.

In ``run --web`` it shows the relay's counters (same process); ``web`` alone
shows the database gauges and process figures, its relay counters stay empty.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .. import metrics
from .auth import require_bearer

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
def scrape(request: Request) -> Response:
    """Sync on purpose: FastAPI runs it on a worker thread, where the backlog query may block."""
    state = request.app.state.web
    if not state.config.web.metrics_public:
        require_bearer(request, metrics.bearer(request.headers.get("authorization")))
    collectors = getattr(request.app.state, "metrics", None)
    if collectors is None:  # one per app, made at the first scrape
        collectors = request.app.state.metrics = metrics.registry(
            _reading(state.connections, "metrics_backlog"), _reading(state.connections, "hooks_capturing"))
    return Response(metrics.render(collectors), media_type=CONTENT_TYPE_LATEST)


def _reading(connections: Any, method: str) -> Any:
    """A Database method run on a connection of the app's pool
    (cdc_hooks.web.dbpool.Connections), for a collector."""
    def fetch() -> Any:
        with connections.database() as db:
            return getattr(db, method)()

    return fetch
