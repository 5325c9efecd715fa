-- Least privileges of cdc-hooks' roles (docs/operations.md, "Permissions").
-- One run, as an administrator (a superuser, or a role with CREATEROLE that
-- owns the hooked table), before the first `cdc-hooks install`:
--
--   psql -v installer=cdc_hooks_installer -v relay=cdc_hooks_relay \
--        -v database=app -v table=public.person -v key=id -f docs/permissions.sql
--
-- Then name the relay's role in the config ([database] relay_role =
-- "cdc_hooks_relay") and run `cdc-hooks install` as the installer: install
-- grants the relay what it needs in the cdc_hooks schema, after every upgrade
-- too. The application's roles need nothing: they write their tables as
-- before, and capture runs with their rights (README, "Security").
-- tests/test_permissions.py runs this file with psql as written here.

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
