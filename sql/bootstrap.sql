-- Run once, before the first migration: the schema and its version record.
CREATE SCHEMA cdc_hooks;
CREATE TABLE cdc_hooks.schema_version (
    version     int PRIMARY KEY,
    applied_at  timestamptz NOT NULL DEFAULT now()
);
