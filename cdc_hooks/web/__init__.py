"""The web interface and REST API: a thin adapter over the core (listeners.py,
hooks.send, db.Database), like the CLI. ``create_app(config)`` builds the
FastAPI application; ``serve`` runs it (``cdc-hooks web``, ``run --web``)."""

from .app import create_app

__all__ = ["create_app"]
