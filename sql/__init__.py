"""The SQL of cdc-hooks, shipped as package data (cdc_hooks.sql)."""
