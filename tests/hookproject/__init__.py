"""A small application for tests/test_python_hooks.py: durian's Person as a Django model,
a member table as a SQLAlchemy model, and their hooks declared in Python (webhooks.py).

Importing models needs Django's settings configured first (the test does it).
"""
