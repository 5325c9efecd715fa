"""The service layer: every read and action on hooks, listeners, deliveries and
status, once, for every interface: the CLI (cli.py), the REST API (web/api.py),
the pages (web/pages.py) and the Python API (registry.py; client.py through the
REST API). The same question gets the same answer from each
(tests/test_interfaces_agree.py). Each function takes a db.Database.
"""

from . import deliveries, hooks, listeners, status

__all__ = ["deliveries", "hooks", "listeners", "status"]
