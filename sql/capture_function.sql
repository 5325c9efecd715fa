-- Template of a hook's capture function, filled in by cdc_hooks.install with
-- psycopg.sql: {function} and {columns} are quoted identifiers, {arrays} pairs
-- each column's name with the array of its values. TG_ARGV: hook name, then
-- the captured columns (key + provided) for the fallback path.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $capture$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'insert', jsonb_build_object('new', jsonb_build_object({arrays}))
        FROM (SELECT {columns}, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM new_rows) AS r
        GROUP BY cdc_hooks_chunk;
    ELSIF TG_OP = 'UPDATE' THEN
        -- Old and new transition rows come in the same order; rows are paired
        -- by position and the relay checks that their keys agree.
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'update', jsonb_build_object('new', n.arrays, 'old', o.arrays)
        FROM (SELECT cdc_hooks_chunk, jsonb_build_object({arrays}) AS arrays
              FROM (SELECT {columns}, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM new_rows) AS r
              GROUP BY cdc_hooks_chunk) AS n
        JOIN (SELECT cdc_hooks_chunk, jsonb_build_object({arrays}) AS arrays
              FROM (SELECT {columns}, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM old_rows) AS r
              GROUP BY cdc_hooks_chunk) AS o USING (cdc_hooks_chunk);
    ELSE
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'delete', jsonb_build_object('old', jsonb_build_object({arrays}))
        FROM (SELECT {columns}, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM old_rows) AS r
        GROUP BY cdc_hooks_chunk;
    END IF;
    PERFORM cdc_hooks.wake_relay();
    RETURN NULL;
EXCEPTION WHEN undefined_column THEN
    -- A captured column was dropped or renamed since install. The application's
    -- write must not fail: capture the columns that still exist (slower), and
    -- let `cdc-hooks check` report the drift.
    IF TG_OP = 'INSERT' THEN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'insert', jsonb_build_object('new', cdc_hooks.column_arrays(jsonb_agg(to_jsonb(r)), TG_ARGV[1]::text[]))
        FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM new_rows) AS r
        GROUP BY cdc_hooks_chunk;
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'update', jsonb_build_object('new', n.arrays, 'old', o.arrays)
        FROM (SELECT cdc_hooks_chunk, cdc_hooks.column_arrays(jsonb_agg(to_jsonb(r)), TG_ARGV[1]::text[]) AS arrays
              FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM new_rows) AS r
              GROUP BY cdc_hooks_chunk) AS n
        JOIN (SELECT cdc_hooks_chunk, cdc_hooks.column_arrays(jsonb_agg(to_jsonb(r)), TG_ARGV[1]::text[]) AS arrays
              FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM old_rows) AS r
              GROUP BY cdc_hooks_chunk) AS o USING (cdc_hooks_chunk);
    ELSE
        INSERT INTO cdc_hooks.outbox (hook, kind, payload)
        SELECT TG_ARGV[0], 'delete', jsonb_build_object('old', cdc_hooks.column_arrays(jsonb_agg(to_jsonb(r)), TG_ARGV[1]::text[]))
        FROM (SELECT *, (row_number() OVER () - 1) / 1000 AS cdc_hooks_chunk FROM old_rows) AS r
        GROUP BY cdc_hooks_chunk;
    END IF;
    PERFORM cdc_hooks.wake_relay();
    RETURN NULL;
END
$capture$;
