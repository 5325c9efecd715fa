"""A Django app for tests/test_recreated_tables.py: one model and its migration,
as `manage.py makemigrations` writes them. Settings are configured in the test."""
