-- Least privileges of cdc-hooks' two roles (docs/operations.md, "Permissions").
-- Run with psql, naming the roles, the database and one hooked table:
--
--   psql -v installer=cdc_hooks_installer -v relay=cdc_hooks_relay \
--        -v database=app -v table=public.person -v key=id -f docs/permissions.sql
--
-- tests/test_permissions.py runs this file as written, then install and a
-- relay with these roles. Part 1 runs as a superuser (or the table's owner and
-- a role with CREATEROLE), once; part 2 as the installer, after every
-- `cdc-hooks install` (an upgrade may add tables; GRANT is idempotent).

-- Part 1: as an administrator ---------------------------------------------------

-- Set passwords with \password, or use certificate or peer authentication.
CREATE ROLE :"installer" LOGIN;
CREATE ROLE :"relay" LOGIN;

-- The installer creates and owns the cdc_hooks schema (install creates it).
GRANT CREATE ON DATABASE :"database" TO :"installer";

-- Per hooked table (and each of its partitions): TRIGGER to install a hook's
-- triggers. Changing or removing a hook drops its triggers, which PostgreSQL
-- allows only to the table's owner: for those, run install as (a member of)
-- the owner, or GRANT the owner role to the installer.
GRANT TRIGGER ON TABLE :table TO :"installer";
-- Only for `cdc-hooks backfill` (run by the installer or another operator's
-- role): reading the rows, and UPDATE on one column, which PostgreSQL requires
-- for the row share-locks a backfill batch takes (it updates nothing).
GRANT SELECT, UPDATE (:"key") ON TABLE :table TO :"installer";

-- Part 2: as the installer, after cdc-hooks install -------------------------

-- The relay: dispatch, delivery, the attempt log, waiting for NOTIFY,
-- retention (DELETE) and listener health (auto-disable updates listeners).
-- Functions such as cdc_hooks.send are executable by everyone by default.
GRANT USAGE ON SCHEMA cdc_hooks TO :"relay";
GRANT SELECT ON cdc_hooks.hooks, cdc_hooks.schema_version TO :"relay";
GRANT SELECT, UPDATE ON cdc_hooks.listeners, cdc_hooks.config_version TO :"relay";
GRANT SELECT, DELETE ON cdc_hooks.outbox TO :"relay";
GRANT SELECT, INSERT, DELETE ON cdc_hooks.events, cdc_hooks.attempts, cdc_hooks.waiters
    TO :"relay";
GRANT SELECT, INSERT, UPDATE, DELETE ON cdc_hooks.deliveries, cdc_hooks.listener_health
    TO :"relay";
