-- Version 7 of the cdc_hooks schema: a hook's triggers come back with its table.
--
-- A table dropped and created again (Django's `migrate app zero` then
-- `migrate app`, test runners that recreate tables) has none of the triggers
-- install put on the old one: its writes commit uncaptured. The relay reports
-- such a hook at once (query hooks_capturing); with [database] repair_triggers
-- = true, install also creates the event trigger cdc_hooks_repair_triggers on
-- the function below (creating an event trigger is a superuser's right), and
-- the triggers come back by themselves: at the end of a CREATE TABLE, or an
-- ALTER TABLE that renames a table to a hook's name, moves it there or
-- attaches a partition, each hook whose table (or a table above the new one in
-- its partition tree) the command touched gets its missing triggers, on the
-- table and every partition below it, and cdc_hooks.hook_relations is
-- refreshed: the outbox's row check accepts changes only from the relations
-- listed there.
--
-- It runs for every role's DDL, so:
-- - SECURITY DEFINER, owned by the installer, who owns the capture functions
--   and alone may attach them (their EXECUTE is revoked from PUBLIC, 0004);
--   the triggers it creates are the ones install would create, nothing else;
-- - a fixed search_path; every identifier quoted by format('%I');
-- - only hooks recorded in cdc_hooks.hooks, matched by schema and name;
-- - a failure is a WARNING: the user's DDL never fails because of it;
-- - unrelated DDL costs one join of its commands against cdc_hooks.hooks, and
--   no subtransaction (the EXCEPTION block is entered only for a hooked table);
--   jit off: set-returning functions' guessed row counts must not make every
--   CREATE TABLE pay a JIT compilation.

-- The missing triggers of one hook on root and every partition below it, as
-- install creates them (install._create_trigger_statements): one per event,
-- named cdc_hooks_<hook>_<event>, on the hook's capture function, with the
-- hook's name and its captured columns (key, then provided, each once) as
-- arguments. Whether it created any.
CREATE FUNCTION cdc_hooks.restore_hook_triggers(hook text, root oid) RETURNS boolean
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    declared  cdc_hooks.hooks;
    captured  text[];
    missing   record;
    created   boolean := false;
BEGIN
    SELECT * INTO declared FROM cdc_hooks.hooks h WHERE h.name = restore_hook_triggers.hook;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    captured := ARRAY(SELECT u.c FROM unnest(declared.key_columns || declared.provides)
                                      WITH ORDINALITY AS u (c, i)
                      GROUP BY u.c ORDER BY min(u.i));
    FOR missing IN
        SELECT format('%I.%I', n.nspname, c.relname) AS relation, e.event,
               'cdc_hooks_' || declared.name || '_' || e.event AS trigger
        FROM (SELECT restore_hook_triggers.root AS relid
              UNION SELECT p.relid FROM pg_partition_tree(restore_hook_triggers.root) AS p) AS r
        JOIN pg_class c ON c.oid = r.relid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        CROSS JOIN unnest(declared.events) AS e (event)
        WHERE e.event IN ('insert', 'update', 'delete')
          AND NOT EXISTS (SELECT FROM pg_trigger g
                          WHERE g.tgrelid = r.relid
                            AND g.tgname = 'cdc_hooks_' || declared.name || '_' || e.event)
        ORDER BY 1, 2
    LOOP
        EXECUTE format(
            'CREATE TRIGGER %I AFTER %s ON %s %s FOR EACH STATEMENT EXECUTE FUNCTION cdc_hooks.%I(%L, %L)',
            missing.trigger, upper(missing.event), missing.relation,
            CASE missing.event
                WHEN 'insert' THEN 'REFERENCING NEW TABLE AS new_rows'
                WHEN 'update' THEN 'REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows'
                ELSE 'REFERENCING OLD TABLE AS old_rows'
            END,
            'capture_' || declared.name, declared.name, captured);
        created := true;
    END LOOP;
    RETURN created;
END
$$;

-- The event trigger's function (install creates the event trigger when
-- [database] repair_triggers = true). Per hook, the triggers and the refreshed
-- hook_relations land together or not at all: triggers without the new table
-- in hook_relations would make its writes fail the outbox's row check.
CREATE FUNCTION cdc_hooks.repair_triggers() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off AS $$
DECLARE
    hooked  record;
BEGIN
    FOR hooked IN
        SELECT DISTINCT h.name, c.oid AS root
        FROM pg_event_trigger_ddl_commands() AS cmd
        CROSS JOIN LATERAL (SELECT cmd.objid AS relid
                            UNION SELECT a.relid FROM pg_partition_ancestors(cmd.objid) AS a) AS up
        JOIN pg_class c ON c.oid = up.relid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        JOIN cdc_hooks.hooks h ON h.table_schema = n.nspname AND h.table_name = c.relname
        WHERE cmd.classid = 'pg_catalog.pg_class'::regclass AND cmd.object_type = 'table'
        ORDER BY h.name
    LOOP
        BEGIN
            IF cdc_hooks.restore_hook_triggers(hooked.name, hooked.root) THEN
                RAISE NOTICE 'cdc_hooks: re-created the triggers of hook "%" on %',
                    hooked.name, hooked.root::regclass;
            END IF;
            PERFORM cdc_hooks.refresh_hook_relations();
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'cdc_hooks: the triggers of hook "%" could not be re-created on %: %',
                hooked.name, hooked.root::regclass, SQLERRM
                USING HINT = 'its writes are not captured: run cdc-hooks install';
        END;
    END LOOP;
END
$$;

-- Only install's event trigger runs them (as the installer).
REVOKE ALL ON FUNCTION cdc_hooks.restore_hook_triggers(text, oid) FROM PUBLIC;
REVOKE ALL ON FUNCTION cdc_hooks.repair_triggers() FROM PUBLIC;
