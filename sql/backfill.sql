-- Templates of `cdc-hooks backfill` (cdc_hooks/backfill.py), filled in with
-- psycopg.sql (backfill.py lists the placeholders; none may appear in a
-- comment below a name header: the operator's condition may hold a newline).
-- The condition is trusted input, parsed as exactly one expression first (so
-- its parentheses balance: it cannot close the one around it) and followed by
-- a newline so that a trailing "--" comment in it cannot swallow the closing
-- parenthesis.

-- name: probe
-- The condition must be boolean and name the table's columns. Run in a
-- read-only transaction that is rolled back; reads no row.
SELECT 1 FROM {table} WHERE ({condition}
) LIMIT 0;

-- name: count
-- The rows of the table: a run that reads more (and still more after counting
-- again) stops, so not even a bug can make a backfill loop.
SELECT count(*) FROM {table};

-- name: estimate
-- The planner's estimate of the rows to read, for the progress bar.
EXPLAIN (FORMAT JSON) SELECT 1 FROM {table} WHERE ({condition}
);

-- name: batch
-- The next rows after the last key reached (the after placeholder: AND (key) >
-- (the last key), empty at the start), queued as 'read' events in the outbox
-- in chunks of up to 1000 rows, in the shape the triggers write (column arrays
-- under "new") plus the listener the backfill is for (NULL: all). FOR SHARE:
-- an update of a row waits until this batch commits, so its event comes after
-- the row's read event and a listener never ends with stale data. Returns the
-- rows read, the text form of the last row's key and how many rows read have a
-- key at or before the previous last key (revisited: always 0, or a bug).
WITH batch AS (
    SELECT {captured}
    FROM {table}
    WHERE ({condition}
    ) AND {key_not_null} {after}
    ORDER BY {key}
    LIMIT %(batch)s
    FOR SHARE
), numbered AS (
    SELECT *, row_number() OVER (ORDER BY {key}) - 1 AS cdc_hooks_n FROM batch
), queued AS (
    INSERT INTO cdc_hooks.outbox (hook, kind, payload, source)
    SELECT %(hook)s, 'read',
           json_build_object('new', json_build_object({arrays}), 'listener', %(listener_id)s::bigint),
           {table_name}::regclass
    FROM numbered
    GROUP BY cdc_hooks_n / 1000
    ORDER BY cdc_hooks_n / 1000
)
SELECT (SELECT count(*) FROM numbered),
       (SELECT ARRAY[{key_text}] FROM numbered ORDER BY cdc_hooks_n DESC LIMIT 1),
       (SELECT count(*) FROM numbered WHERE {revisited});
