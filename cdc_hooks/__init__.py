"""cdc-hooks: change-data-capture from PostgreSQL to signed webhooks.

The Python API mirrors durian's: ``hooks`` (the registry), ``Hook`` and
``ModelHook``, the matching classes and ``deepmatch``, and ``send``.
"""

from .match import Any, Contains, Endswith, Is, Like, Startswith, deepmatch
from .registry import Hook, ListenerBuilder, ModelHook, Registry, hooks, send

__all__ = [
    "Any", "Contains", "Endswith", "Hook", "Is", "Like", "ListenerBuilder", "ModelHook",
    "Registry", "Startswith", "deepmatch", "hooks", "send",
]
