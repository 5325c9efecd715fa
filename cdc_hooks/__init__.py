"""cdc-hooks: change-data-capture from PostgreSQL to signed webhooks.

The Python API mirrors durian's: ``hooks`` (the registry), ``Hook`` and
``ModelHook``, the matching classes and ``deepmatch``, and ``send``.
"""

from .hooks import Hook, ListenerBuilder, ModelHook, Registry, hooks, send
from .match import Any, Contains, Endswith, Is, Like, Startswith, deepmatch

__all__ = [
    "Any", "Contains", "Endswith", "Hook", "Is", "Like", "ListenerBuilder", "ModelHook",
    "Registry", "Startswith", "deepmatch", "hooks", "send",
]
