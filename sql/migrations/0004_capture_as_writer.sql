-- Version 4 of the cdc_hooks schema: capture runs with the writer's rights.
--
-- Capture functions used to be SECURITY DEFINER. Converting a column to JSON
-- runs a cast to json of the column's type when one exists, and a table's
-- owner may create a type, a cast and ALTER its column to that type: its next
-- write ran the cast with the installer's rights (superuser, the listeners'
-- secrets, the whole outbox). Capture functions are now SECURITY INVOKER
-- (install re-creates them), so whatever a conversion runs, runs as the
-- writer. The writer therefore inserts into the outbox itself, through the
-- checks below, and gains nothing it did not have: it may record an event only
-- for a hook whose table (or partition) it changed, with the right that change
-- needs on it. The installer (the outbox's owner) is not subject to them.

-- The relations each table hook captures: its table and every partition below
-- it, by oid, as install last saw them (refresh_hook_relations). Readable by
-- everyone: the row check below reads it as the writer, and it holds nothing
-- that pg_trigger does not show already.
CREATE TABLE cdc_hooks.hook_relations (
    relid  oid NOT NULL,
    hook   text NOT NULL,
    PRIMARY KEY (relid, hook)
);

CREATE FUNCTION cdc_hooks.refresh_hook_relations() RETURNS void
LANGUAGE sql SET search_path = pg_catalog, pg_temp AS $$
    DELETE FROM cdc_hooks.hook_relations;
    INSERT INTO cdc_hooks.hook_relations (relid, hook)
    SELECT DISTINCT r.relid, h.name
    FROM cdc_hooks.hooks h,
         LATERAL (SELECT to_regclass(format('%I.%I', h.table_schema, h.table_name)) AS root) t,
         LATERAL (SELECT t.root AS relid UNION SELECT p.relid FROM pg_partition_tree(t.root) p) r
    WHERE h.table_name IS NOT NULL AND r.relid IS NOT NULL;
$$;

-- The relation a captured change came from (the trigger's TG_RELID); NULL for
-- custom events, which name no table.
ALTER TABLE cdc_hooks.outbox ADD COLUMN source oid;

-- Writers name the hook, the kind of change, the payload and the source; the
-- id and the time are the outbox's own (no OVERRIDING SYSTEM VALUE that could
-- take an id another writer's row is about to get).
GRANT USAGE ON SCHEMA cdc_hooks TO PUBLIC;
GRANT INSERT (hook, kind, payload, source) ON cdc_hooks.outbox TO PUBLIC;
GRANT SELECT ON cdc_hooks.hook_relations TO PUBLIC;

ALTER TABLE cdc_hooks.outbox ENABLE ROW LEVEL SECURITY;

-- A change of a hooked relation, by a role holding the privilege the change
-- needs on it (column-level grants count for INSERT and UPDATE, as PostgreSQL
-- counts them for the statement); 'read' is a backfill's event.
CREATE POLICY captured_change ON cdc_hooks.outbox FOR INSERT TO PUBLIC WITH CHECK (
    EXISTS (SELECT FROM cdc_hooks.hook_relations r WHERE r.relid = source AND r.hook = outbox.hook)
    AND CASE kind
        WHEN 'insert' THEN pg_catalog.has_any_column_privilege(source, 'INSERT')
        WHEN 'update' THEN pg_catalog.has_any_column_privilege(source, 'UPDATE')
        WHEN 'delete' THEN pg_catalog.has_table_privilege(source, 'DELETE')
        WHEN 'truncate' THEN pg_catalog.has_table_privilege(source, 'TRUNCATE')
        WHEN 'read' THEN pg_catalog.has_table_privilege(source, 'SELECT')
        ELSE false
    END
);

-- Who may send a custom hook: cdc-hooks itself (a member of the schema's owner,
-- or a role that manages listeners: the installer and the relay), and for a
-- hook that is not built in, the roles named in its `senders`.
ALTER TABLE cdc_hooks.hooks ADD COLUMN senders text[] NOT NULL DEFAULT '{}';

-- SECURITY DEFINER to read cdc_hooks.hooks; who is only trusted because the
-- row check passes current_user, evaluated as the inserting role.
CREATE FUNCTION cdc_hooks.may_send(hook text, who name) RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT pg_has_role(who, (SELECT nspowner FROM pg_namespace WHERE nspname = 'cdc_hooks'), 'USAGE')
        OR has_table_privilege(who, 'cdc_hooks.listeners', 'UPDATE')
        OR EXISTS (SELECT FROM cdc_hooks.hooks h, unnest(h.senders) AS s (role)
                   WHERE h.name = may_send.hook AND h.table_name IS NULL
                     AND h.name NOT LIKE 'cdc\_hooks.%'
                     AND pg_has_role(who, s.role, 'USAGE'))
$$;

CREATE POLICY custom_event ON cdc_hooks.outbox FOR INSERT TO PUBLIC WITH CHECK (
    source IS NULL AND kind = hook AND cdc_hooks.may_send(hook, current_user)
);

-- Reading and deleting stay governed by table privileges (the relay's grants).
CREATE POLICY relay_reads ON cdc_hooks.outbox FOR SELECT TO PUBLIC USING (true);
CREATE POLICY relay_takes ON cdc_hooks.outbox FOR DELETE TO PUBLIC USING (true);

-- The provides of a custom hook, for send; raises for anything else.
CREATE FUNCTION cdc_hooks.custom_hook_provides(hook text) RETURNS text[]
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    declared  cdc_hooks.hooks;
BEGIN
    SELECT * INTO declared FROM cdc_hooks.hooks h WHERE h.name = custom_hook_provides.hook;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'cdc_hooks.send: unknown hook "%"', hook USING ERRCODE = 'undefined_object';
    END IF;
    IF declared.table_name IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_hooks.send: hook "%" is bound to table %.%; only custom hooks are sent',
            hook, declared.table_schema, declared.table_name USING ERRCODE = 'wrong_object_type';
    END IF;
    RETURN declared.provides;
END
$$;

-- The id the outbox gave this session's last row (currval of its identity).
CREATE FUNCTION cdc_hooks.last_outbox_id() RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT currval(pg_get_serial_sequence('cdc_hooks.outbox', 'id'))
$$;

-- durian's Hook.send, now with the caller's rights: the outbox's row check
-- decides, and a refusal is explained before it would fire.
CREATE OR REPLACE FUNCTION cdc_hooks.send(hook text, payload jsonb) RETURNS bigint
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    provides  text[] := cdc_hooks.custom_hook_provides(hook);
    extra     text[];
BEGIN
    IF jsonb_typeof(payload) IS DISTINCT FROM 'object' THEN
        RAISE EXCEPTION 'cdc_hooks.send: payload must be a JSON object' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT array_agg(k ORDER BY k) INTO extra
    FROM jsonb_object_keys(payload) AS k WHERE k <> ALL (provides);
    IF extra IS NOT NULL THEN
        RAISE EXCEPTION 'cdc_hooks.send: hook "%" does not provide %', hook, array_to_string(extra, ', ')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF NOT cdc_hooks.may_send(hook, current_user) THEN
        RAISE EXCEPTION 'cdc_hooks.send: role "%" may not send hook "%"', current_user, hook
            USING ERRCODE = 'insufficient_privilege',
                  HINT = CASE WHEN hook LIKE 'cdc\_hooks.%' THEN 'built-in hooks are sent by cdc-hooks only'
                         ELSE 'name the role in the hook''s senders and run cdc-hooks install' END;
    END IF;
    INSERT INTO cdc_hooks.outbox (hook, kind, payload)
    VALUES (hook, hook, jsonb_build_object('data', payload));
    PERFORM cdc_hooks.wake_relay();
    RETURN cdc_hooks.last_outbox_id() * 1000;
END
$$;
