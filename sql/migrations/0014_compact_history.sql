-- Version 14 of the cdc_hooks schema: fewer bytes per delivered event
-- (bench/bench_storage.py measures them).
--
-- A delivery delivered at its first attempt, the common case, keeps that attempt
-- itself instead of a row in the attempt log (a row there cost about 90 bytes with
-- its two index entries): its status code is last_status, its error last_error,
-- its time finished_at (the same now() the log row had), and its duration and
-- response are here. record_results fills them; redeliver moves them to the log
-- first. The view attempt_log is what users see: every attempt, either kind.
ALTER TABLE cdc_hooks.deliveries ADD COLUMN first_try_ms real, ADD COLUMN first_try_response text;

CREATE VIEW cdc_hooks.attempt_log AS
SELECT delivery_id, attempted_at, status_code, duration_ms, error, response
FROM cdc_hooks.attempts
UNION ALL
SELECT id, finished_at, last_status, first_try_ms, last_error, first_try_response
FROM cdc_hooks.deliveries
WHERE first_try_ms IS NOT NULL;

-- An event's body is kept once, without its envelope ({"id", "hook", "event",
-- "created", "occurred_at"}: about 115 of a small event's bytes), which the
-- row's columns hold already: from "key" on, as '{"key":...'. This puts the
-- body POSTed together again, as relay/events.py built it, byte for byte
-- (occurred_at in UTC, microseconds unless 0, as Python's isoformat writes it).
-- A body kept whole (before version 14) is returned as it is. Plain SQL without
-- SET, so that the planner inlines it into the queries that read bodies.
CREATE FUNCTION cdc_hooks.event_body(id bigint, hook text, kind text, occurred_at timestamptz,
                                     body json) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN pg_catalog.left(body::text, 7) <> '{"key":' THEN body::text
    ELSE '{"id":"evt_' || id::text || '","hook":' || pg_catalog.to_json(hook)::text
         || ',"event":' || pg_catalog.to_json(kind)::text
         || ',"created":' || (kind = 'insert')::text
         || ',"occurred_at":"'
         || pg_catalog.to_char(occurred_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
         || CASE WHEN pg_catalog.date_part('microseconds', occurred_at)::bigint % 1000000 = 0 THEN ''
                 ELSE pg_catalog.to_char(occurred_at AT TIME ZONE 'UTC', '.US') END
         || '+00:00",' || pg_catalog.substr(body::text, 2)
    END
$$;

-- Once a delivery finished its due time means nothing (it is shown only while
-- pending): record_results clears it, 8 bytes of each finished delivery.
ALTER TABLE cdc_hooks.deliveries ALTER COLUMN next_attempt_at DROP NOT NULL;

-- Written by dispatch and never read: deliveries keep their row's key themselves.
ALTER TABLE cdc_hooks.events DROP COLUMN row_key;

-- A hook's latest events (web_recent_events, the filter preview) by an index on
-- the hook alone: btree deduplication keeps its repeated keys as posting lists,
-- about 7 bytes an event where (hook, id DESC) took 32 (57 as it grew: new ids
-- went to the left of each hook's range, splitting pages in half). The planner
-- reads a common hook's latest events backwards along the primary key instead.
DROP INDEX cdc_hooks.events_hook_recent;
CREATE INDEX events_by_hook ON cdc_hooks.events (hook);

-- Events are inserted in id order and never updated: the pages of their primary
-- key are filled, not left 10% empty for inserts that never come. (Not so for
-- deliveries: every update of one adds index entries beside the old ones.)
ALTER INDEX cdc_hooks.events_pkey SET (fillfactor = 100);
