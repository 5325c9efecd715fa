-- Template of a hook's capture function, filled in by cdc_hooks.install with
-- psycopg.sql (install.py: function, hook, and _capture_fragments; none may
-- appear in a comment, where a column name's newline would end the comment).
-- TG_ARGV: hook name, then the captured columns (key + provided) for the
-- fallback path.
--
-- Cost matters here: this runs inside every application statement on the
-- table (bench/bench_capture.py measures it; bench/RESULTS-capture.md has the
-- figures and what did not pay). Hence:
-- - SECURITY INVOKER: it runs with the writer's rights, because converting a
--   column to JSON may run code the table's owner wrote (a cast to json of its
--   own type). The outbox's row check (migration 0004) lets the writer record
--   only changes of this hook's table, which is why each row names its source.
--   No SET search_path (its save and restore cost a single-row INSERT about a
--   tenth of the trigger): every function, operator and type below is schema-
--   qualified instead, so a caller's search_path changes nothing. Keep it so.
-- - A one-row statement, the common case, skips aggregation and chunking,
--   whose executor setup costs more than encoding the row. TG_OP is tested
--   once per path: even that costs, each statement being its own transaction.
-- - payload is json, not jsonb: built as text, without jsonb's conversion.
-- - The hook's name is a literal, not TG_ARGV[0]: a parameter costs the plan.
-- - TRUNCATE (its own statement trigger, without transition tables) is tested
--   in the last ELSIF: inserts and updates never test for it.
-- Columns are always qualified (r., n., o.) and variables win conflicts: a
-- table may have a column named new, old or tg_argv, like trigger variables.
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger
LANGUAGE plpgsql AS $capture$
#variable_conflict use_variable
DECLARE
    saved pg_catalog.text[];
BEGIN
    -- Each branch first asks whether the statement changed more than one row.
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        PERFORM FROM new_rows OFFSET 1 LIMIT 1;
        IF NOT FOUND THEN
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'insert', pg_catalog.format({new_format}, {values})::pg_catalog.json, TG_RELID
            FROM new_rows AS r;
        ELSE
            saved := cdc_hooks.begin_chunked();
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'insert', pg_catalog.json_build_object('new', pg_catalog.json_build_object({arrays})), TG_RELID
            FROM (SELECT {columns}, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                  FROM new_rows AS r) AS r
            GROUP BY cdc_hooks_chunk;
            PERFORM cdc_hooks.end_chunked(saved);
        END IF;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        PERFORM FROM new_rows OFFSET 1 LIMIT 1;
        IF NOT FOUND THEN
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'update', pg_catalog.format({update_format}, {update_values})::pg_catalog.json, TG_RELID
            FROM new_rows AS n, old_rows AS o;
        ELSE
            -- Old and new transition rows come in the same order; rows are paired
            -- by position and the relay checks that their keys agree.
            saved := cdc_hooks.begin_chunked();
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'update', pg_catalog.json_build_object('new', n.arrays, 'old', o.arrays), TG_RELID
            FROM (SELECT cdc_hooks_chunk, pg_catalog.json_build_object({arrays}) AS arrays
                  FROM (SELECT {columns}, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                        FROM new_rows AS r) AS r
                  GROUP BY cdc_hooks_chunk) AS n
            JOIN (SELECT cdc_hooks_chunk, pg_catalog.json_build_object({arrays}) AS arrays
                  FROM (SELECT {columns}, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                        FROM old_rows AS r) AS r
                  GROUP BY cdc_hooks_chunk) AS o USING (cdc_hooks_chunk);
            PERFORM cdc_hooks.end_chunked(saved);
        END IF;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'TRUNCATE' THEN
        -- One event per statement, without key or data (relay/events.py).
        INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
        VALUES ({hook}, 'truncate', '{{}}'::pg_catalog.json, TG_RELID);
    ELSE
        PERFORM FROM old_rows OFFSET 1 LIMIT 1;
        IF NOT FOUND THEN
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'delete', pg_catalog.format({old_format}, {values})::pg_catalog.json, TG_RELID
            FROM old_rows AS r;
        ELSE
            saved := cdc_hooks.begin_chunked();
            INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
            SELECT {hook}, 'delete', pg_catalog.json_build_object('old', pg_catalog.json_build_object({arrays})), TG_RELID
            FROM (SELECT {columns}, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                  FROM old_rows AS r) AS r
            GROUP BY cdc_hooks_chunk;
            PERFORM cdc_hooks.end_chunked(saved);
        END IF;
    END IF;
    -- Wake a waiting relay: NOTIFY only while one holds the advisory lock
    -- (1667523432, 1), see cdc_hooks.waiters. Taking it shared and dropping it
    -- at once fails only then; it costs less than reading any table.
    IF NOT (pg_catalog.pg_try_advisory_lock_shared(1667523432, 1)
            AND pg_catalog.pg_advisory_unlock_shared(1667523432, 1)) THEN
        PERFORM pg_catalog.pg_notify('cdc_hooks', '');
    END IF;
    RETURN NULL;
EXCEPTION WHEN undefined_column THEN
    -- A captured column was dropped or renamed since install. The application's
    -- write must not fail: capture the columns that still exist (slower), and
    -- let `cdc-hooks check` report the drift.
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
        SELECT TG_ARGV[0], 'insert', pg_catalog.jsonb_build_object('new',
                   cdc_hooks.column_arrays(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(r)), TG_ARGV[1]::pg_catalog.text[])), TG_RELID
        FROM (SELECT *, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
              FROM new_rows) AS r
        GROUP BY cdc_hooks_chunk;
    ELSIF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN
        INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
        SELECT TG_ARGV[0], 'update', pg_catalog.jsonb_build_object('new', n.arrays, 'old', o.arrays), TG_RELID
        FROM (SELECT cdc_hooks_chunk,
                     cdc_hooks.column_arrays(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(r)), TG_ARGV[1]::pg_catalog.text[]) AS arrays
              FROM (SELECT *, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                    FROM new_rows) AS r
              GROUP BY cdc_hooks_chunk) AS n
        JOIN (SELECT cdc_hooks_chunk,
                     cdc_hooks.column_arrays(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(r)), TG_ARGV[1]::pg_catalog.text[]) AS arrays
              FROM (SELECT *, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
                    FROM old_rows) AS r
              GROUP BY cdc_hooks_chunk) AS o USING (cdc_hooks_chunk);
    ELSE
        INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
        SELECT TG_ARGV[0], 'delete', pg_catalog.jsonb_build_object('old',
                   cdc_hooks.column_arrays(pg_catalog.jsonb_agg(pg_catalog.to_jsonb(r)), TG_ARGV[1]::pg_catalog.text[])), TG_RELID
        FROM (SELECT *, (pg_catalog.row_number() OVER () OPERATOR(pg_catalog.-) 1) OPERATOR(pg_catalog./) 1000 AS cdc_hooks_chunk
              FROM old_rows) AS r
        GROUP BY cdc_hooks_chunk;
    END IF;
    PERFORM cdc_hooks.wake_relay();
    RETURN NULL;
END
$capture$;
