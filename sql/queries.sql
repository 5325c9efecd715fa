-- Named queries, loaded by cdc_hooks.db: each starts with "-- name: NAME".
-- Parameters use psycopg's %(name)s style.

-- name: schema_version
SELECT coalesce(max(version), 0) FROM cdc_hooks.schema_version;

-- name: record_schema_version
INSERT INTO cdc_hooks.schema_version (version) VALUES (%(version)s);

-- name: lock_install
-- One installer at a time; held until the install transaction ends.
SELECT pg_advisory_xact_lock(hashtext('cdc_hooks.install'));

-- name: schema_exists
SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'cdc_hooks');

-- name: installed_hooks
-- senders through to_jsonb: install plans (and check compares) before the
-- migration that added the column has run.
SELECT name, table_schema, table_name, events, provides, key_columns, when_changed,
       ARRAY(SELECT jsonb_array_elements_text(coalesce(to_jsonb(h) -> 'senders', '[]'))) AS senders
FROM cdc_hooks.hooks h ORDER BY name;

-- name: save_hook
INSERT INTO cdc_hooks.hooks AS h (name, table_schema, table_name, events, provides, key_columns,
                                  when_changed, senders)
VALUES (%(name)s, %(table_schema)s, %(table_name)s, %(events)s, %(provides)s, %(key_columns)s,
        %(when_changed)s, %(senders)s)
ON CONFLICT (name) DO UPDATE SET
    table_schema = excluded.table_schema, table_name = excluded.table_name,
    events = excluded.events, provides = excluded.provides,
    key_columns = excluded.key_columns, when_changed = excluded.when_changed,
    senders = excluded.senders, installed_at = now();

-- name: refresh_hook_relations
-- The relations whose changes each hook may record (the outbox's row check).
SELECT cdc_hooks.refresh_hook_relations();

-- name: unique_keys
-- The indexes that make rows of a table unique on plain columns (primary key,
-- unique constraints, unique indexes): valid, not partial, no expressions.
-- columns: the key columns (not INCLUDE ones); not_null: each is NOT NULL;
-- nulls_not_distinct: NULLS NOT DISTINCT (PostgreSQL 15+; read through
-- to_jsonb, as older servers lack the column), so a NULL is unique too.
-- The table by name, not to_regclass: that needs USAGE on its schema.
SELECT ic.relname::text AS index,
       ARRAY(SELECT a.attname::text
             FROM unnest(i.indkey) WITH ORDINALITY AS k (attnum, pos)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
             WHERE k.pos <= i.indnkeyatts ORDER BY k.pos) AS columns,
       NOT EXISTS (SELECT FROM unnest(i.indkey) WITH ORDINALITY AS k (attnum, pos)
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                   WHERE k.pos <= i.indnkeyatts AND NOT a.attnotnull) AS not_null,
       coalesce((to_jsonb(i) ->> 'indnullsnotdistinct')::boolean, false) AS nulls_not_distinct
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class c ON c.oid = i.indrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s
  AND i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
ORDER BY i.indisprimary DESC, ic.relname;

-- name: hooks_capturing
-- Per table hook: whether its table exists, and which of the triggers install
-- gave it (one per event, on the table and every partition below it) are
-- missing or disabled, as 'trigger on relation'. A table dropped and created
-- again (Django's migrate app zero, test runners) has none: its writes commit
-- uncaptured. A catalog read, cheap enough for the relay every few seconds:
-- the relations as an array, so that the planner does not expect a thousand
-- partitions per hook (that estimate made it JIT-compile the query, 90 ms).
-- By name, not to_regclass, which needs USAGE on the table's schema.
SELECT h.name, h.table_schema, h.table_name, t.relid IS NOT NULL AS table_exists,
       ARRAY(SELECT tg.name || ' on ' || (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
                                         FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                         WHERE c.oid = r.relid)
                    || CASE WHEN g.tgenabled = 'D' THEN ' (disabled)' ELSE '' END
             FROM unnest(t.relid || ARRAY(SELECT p.relid::oid FROM pg_partition_tree(t.relid) AS p
                                          WHERE p.level > 0)) AS r (relid)
             CROSS JOIN unnest(h.events) AS e (event)
             CROSS JOIN LATERAL (SELECT 'cdc_hooks_' || h.name || '_' || e.event AS name) AS tg
             LEFT JOIN pg_trigger g ON g.tgrelid = r.relid AND g.tgname = tg.name
             WHERE t.relid IS NOT NULL AND (g.oid IS NULL OR g.tgenabled = 'D')
             ORDER BY 1) AS missing
FROM cdc_hooks.hooks h
LEFT JOIN LATERAL (
    SELECT c.oid AS relid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = coalesce(h.table_schema, 'public') AND c.relname = h.table_name
) AS t ON true
WHERE h.table_name IS NOT NULL
ORDER BY h.name;

-- name: repair_trigger_exists
-- [database] repair_triggers: install's event trigger (migration 0007).
SELECT EXISTS (SELECT FROM pg_event_trigger WHERE evtname = 'cdc_hooks_repair_triggers');

-- name: create_repair_trigger
-- Only the commands that can bring a table under a hook's name.
CREATE EVENT TRIGGER cdc_hooks_repair_triggers ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE')
    EXECUTE FUNCTION cdc_hooks.repair_triggers();

-- name: drop_repair_trigger
DROP EVENT TRIGGER IF EXISTS cdc_hooks_repair_triggers;

-- name: is_superuser
SELECT rolsuper FROM pg_roles WHERE rolname = current_user;

-- name: current_role
SELECT current_user::text;

-- name: hook_listeners
-- Every listener's hook, match and state: what a config change could strand.
SELECT id, hook, match::text AS match, state FROM cdc_hooks.listeners ORDER BY id;

-- name: missing_roles
SELECT r FROM unnest(%(roles)s::text[]) AS r WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r);

-- name: grant_relay
-- The relay's least privileges ({role}: [database] relay_role), given by
-- install after every migration: dispatch, delivery, the attempt log, waiting
-- for NOTIFY, retention (DELETE), listener health (auto-disable updates
-- listeners) and the built-in cdc_hooks.listener_disabled event.
GRANT USAGE ON SCHEMA cdc_hooks TO {role};
GRANT SELECT ON cdc_hooks.hooks, cdc_hooks.schema_version, cdc_hooks.attempt_log TO {role};
GRANT SELECT, UPDATE ON cdc_hooks.listeners, cdc_hooks.config_version TO {role};
GRANT SELECT, DELETE ON cdc_hooks.outbox TO {role};
GRANT SELECT, INSERT, DELETE ON cdc_hooks.events, cdc_hooks.attempts, cdc_hooks.waiters TO {role};
GRANT SELECT, INSERT, UPDATE, DELETE ON cdc_hooks.deliveries, cdc_hooks.listener_health,
    cdc_hooks.listener_slots, cdc_hooks.circuits TO {role};
GRANT SELECT, INSERT, DELETE ON cdc_hooks.relay_sessions TO {role};
GRANT SELECT, INSERT, UPDATE ON cdc_hooks.listener_pace TO {role};

-- name: forget_hook
DELETE FROM cdc_hooks.hooks WHERE name = %(name)s;

-- name: table_triggers
-- Triggers of ours on a table, by name.
SELECT t.tgname
FROM pg_trigger t
JOIN pg_class c ON c.oid = t.tgrelid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = %(schema)s AND c.relname = %(table)s AND t.tgname LIKE 'cdc\_hooks\_%%'
ORDER BY t.tgname;

-- name: table_partitions
-- Every partition below a partitioned table (none for a plain table).
SELECT n.nspname::text, c.relname::text
FROM pg_partition_tree(to_regclass(quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))) AS t
JOIN pg_class c ON c.oid = t.relid
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE t.level > 0
ORDER BY t.level, n.nspname, c.relname;

-- name: table_columns
-- Live columns of a table (NULL list if the table is gone).
SELECT array_agg(a.attname::text ORDER BY a.attnum)
FROM pg_attribute a
WHERE a.attrelid = to_regclass(quote_ident(%(schema)s) || '.' || quote_ident(%(table)s))
  AND a.attnum > 0 AND NOT a.attisdropped;

-- name: function_comment
-- The fingerprint install leaves on a capture function (NULL if it is gone).
SELECT obj_description(to_regprocedure('cdc_hooks.' || quote_ident(%(function)s) || '()'), 'pg_proc');

-- name: function_exists
SELECT to_regprocedure('cdc_hooks.' || quote_ident(%(function)s) || '()') IS NOT NULL;

-- name: pending_counts
SELECT (SELECT count(*) FROM cdc_hooks.outbox) AS outbox,
       (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending') AS deliveries;

-- name: send
SELECT cdc_hooks.send(%(hook)s, %(payload)s::jsonb);

-- Listeners -----------------------------------------------------------------

-- name: add_listener
INSERT INTO cdc_hooks.listeners (hook, url, match, config, secret, headers, events, changed,
                                  rate)
VALUES (%(hook)s, %(url)s, %(match)s::jsonb, %(config)s::jsonb, %(secret)s, %(headers)s::jsonb,
        nullif(%(events)s::text[], '{}'), nullif(%(changed)s::text[], '{}'), %(rate)s::float8)
RETURNING id;

-- name: list_listeners
-- Without secrets nor header values: they are shown once, at creation.
SELECT l.id, l.hook, l.url, l.match::text AS match, l.state, l.disabled_reason, l.created_at, l.updated_at,
       l.config -> 'backfill' IS DISTINCT FROM 'false' AS backfill,
       ARRAY(SELECT k FROM jsonb_object_keys(l.headers) k ORDER BY lower(k)) AS header_names,
       CASE WHEN l.previous_secret_until > now() THEN l.previous_secret_until END AS overlap_until,
       l.events, l.changed, l.rate,
       last.status AS last_status, last.last_status AS last_code, last.last_error,
       last.finished_at AS last_finished_at
FROM cdc_hooks.listeners l
LEFT JOIN LATERAL (
    SELECT d.status, d.last_status, d.last_error, d.finished_at
    FROM cdc_hooks.deliveries d
    WHERE d.listener_id = l.id AND d.attempts > 0
    ORDER BY d.id DESC LIMIT 1
) last ON true
ORDER BY l.id;

-- name: get_listener
SELECT id, hook, url, match::text AS match, state, disabled_reason, created_at, updated_at,
       config -> 'backfill' IS DISTINCT FROM 'false' AS backfill,
       ARRAY(SELECT k FROM jsonb_object_keys(l.headers) k ORDER BY lower(k)) AS header_names,
       CASE WHEN l.previous_secret_until > now() THEN l.previous_secret_until END AS overlap_until,
       l.events, l.changed, l.rate
FROM cdc_hooks.listeners l WHERE id = %(id)s;

-- name: remove_listener_deliveries
DELETE FROM cdc_hooks.deliveries WHERE listener_id = %(id)s;

-- name: remove_listener
DELETE FROM cdc_hooks.listeners WHERE id = %(id)s RETURNING id;

-- name: set_listener_state
UPDATE cdc_hooks.listeners
SET state = %(state)s, disabled_reason = %(reason)s, updated_at = now()
WHERE id = %(id)s
RETURNING id;

-- name: update_listener
-- A new secret keeps the one it replaces signing beside it for `overlap` seconds
-- (none: 0); on the right of SET, secret is the value before this UPDATE.
UPDATE cdc_hooks.listeners
SET url = coalesce(%(url)s, url), match = coalesce(%(match)s::jsonb, match),
    headers = coalesce(%(headers)s::jsonb, headers),
    secret = coalesce(%(secret)s, secret), updated_at = now(),
    previous_secret = CASE WHEN %(secret)s::text IS NULL THEN previous_secret
                           WHEN %(overlap)s::float8 > 0 THEN secret END,
    previous_secret_until = CASE WHEN %(secret)s::text IS NULL THEN previous_secret_until
                                 WHEN %(overlap)s::float8 > 0
                                 THEN now() + make_interval(secs => %(overlap)s::float8) END,
    -- an empty array resets a filter to its default (NULL)
    events = CASE WHEN %(events)s::text[] IS NULL THEN events
                  ELSE nullif(%(events)s::text[], '{}') END,
    changed = CASE WHEN %(changed)s::text[] IS NULL THEN changed
                   ELSE nullif(%(changed)s::text[], '{}') END,
    rate = CASE WHEN %(set_rate)s::bool THEN %(rate)s::float8 ELSE rate END,
    config = CASE WHEN %(backfill)s::bool IS NULL THEN config
                  ELSE config || jsonb_build_object('backfill', %(backfill)s::bool) END
WHERE id = %(id)s
RETURNING id;

-- name: active_listeners
-- What the relay matches events against and signs with; backfill: whether it
-- takes backfill ('read') events (config {"backfill": false} opts out); events
-- and changed: its filters (NULL: none); the secret a rotation replaced while it
-- still signs, with the seconds it has left (relative: the relay's clock need not
-- agree with the database's); rate: its rate limit (NULL: none).
SELECT id, hook, url, match::text, secret, state, config -> 'backfill' IS DISTINCT FROM 'false',
       events, changed, rate, headers, CASE WHEN previous_secret_until > now() THEN previous_secret END,
       extract(epoch FROM previous_secret_until - now())::float8
FROM cdc_hooks.listeners WHERE state <> 'disabled';

-- Relay: dispatch ------------------------------------------------------------

-- name: try_lock_dispatch
-- One dispatcher at a time across relays keeps events of a row in commit order.
SELECT pg_try_advisory_xact_lock(hashtext('cdc_hooks.dispatch'));

-- name: take_outbox
DELETE FROM cdc_hooks.outbox
WHERE id IN (SELECT id FROM cdc_hooks.outbox ORDER BY id LIMIT %(limit)s)
RETURNING id, hook, kind, payload::text, occurred_at,
          (SELECT version FROM cdc_hooks.config_version);

-- name: copy_events
COPY cdc_hooks.events (id, hook, kind, body, occurred_at) FROM STDIN;

-- name: insert_deliveries
-- New deliveries. Those marked direct are leased at once to the dispatching
-- relay, which sends them without a claim round trip, unless an older delivery
-- of their row is still pending for the listener (per-row order): such a
-- delivery, or one after another of its row in this batch (first = false), is
-- queued behind, and claims check its turn. A TRUNCATE's delivery (row_key '*',
-- relay/events.py ALL_ROWS) is always queued behind, and so is every delivery
-- made while one of its listener is pending. Returns the leased ones, claimed
-- by the relay's session (relay_sessions).
-- deliveries: one JSON array of [event_id, listener_id, row_key, direct, first].
INSERT INTO cdc_hooks.deliveries (event_id, listener_id, row_key, attempts, next_attempt_at,
                                  queued_behind, claimed_by)
SELECT x.event_id, x.listener_id, x.row_key, (x.direct AND NOT x.behind)::int,
       CASE WHEN x.direct AND NOT x.behind THEN now() + make_interval(secs => %(lease)s)
            ELSE now() END,
       x.behind, CASE WHEN x.direct AND NOT x.behind THEN %(session)s::bigint END
FROM (
    SELECT u.event_id, u.listener_id, u.row_key, u.direct,
           u.row_key IS NOT NULL AND (NOT u.first OR EXISTS (
               SELECT 1 FROM cdc_hooks.deliveries e
               WHERE e.listener_id = u.listener_id AND e.row_key = u.row_key
                 AND e.status = 'pending') OR EXISTS (
               -- a probe of its own: one IN (row_key, '*') made bench_relay's throughput 4x lower
               SELECT 1 FROM cdc_hooks.deliveries e
               WHERE e.listener_id = u.listener_id AND e.row_key = '*'
                 AND e.status = 'pending')) AS behind
    FROM (SELECT (r ->> 0)::bigint AS event_id, (r ->> 1)::bigint AS listener_id,
                 r ->> 2 AS row_key, (r ->> 3)::bool AS direct, (r ->> 4)::bool AS first
          FROM json_array_elements(%(deliveries)s::json) AS r) AS u
) x
RETURNING id, event_id, listener_id, attempts;

-- name: deliveries_statistics_stale
-- Whether the planner's picture of the deliveries table is far behind: never
-- analyzed, or changed by more than half since (autovacuum may be off, or not
-- yet around). Without statistics, the per-row order probes of claims and
-- inserts go through the wrong index and scan a listener's whole backlog.
-- Only for a role that may analyze it (its owner, or a superuser).
SELECT coalesce(s.n_mod_since_analyze > greatest(%(min_changes)s, c.reltuples / 2), false)
       AND pg_has_role(c.relowner, 'USAGE')
FROM pg_class c
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.oid = 'cdc_hooks.deliveries'::regclass;

-- name: analyze_deliveries
ANALYZE cdc_hooks.deliveries;

-- name: backend_pid
SELECT pg_backend_pid();

-- name: relay_session_settings
-- The relay's session (db.py RelayStore.tune_session says why).
SELECT pg_catalog.set_config('synchronous_commit', 'off', false),
       pg_catalog.set_config('plan_cache_mode', 'force_custom_plan', false),
       pg_catalog.set_config('jit', 'off', false);

-- name: listen_events
LISTEN cdc_hooks;

-- name: listen_listeners
LISTEN cdc_hooks_listeners;

-- name: outbox_nonempty
SELECT EXISTS (SELECT 1 FROM cdc_hooks.outbox);

-- Relay: waiting for work ----------------------------------------------------

-- name: register_waiter
INSERT INTO cdc_hooks.waiters (pid) VALUES (pg_backend_pid()) ON CONFLICT DO NOTHING;

-- name: unregister_waiter
DELETE FROM cdc_hooks.waiters WHERE pid = pg_backend_pid();

-- name: prune_waiters
-- Rows left by relays that died: their backends are gone.
DELETE FROM cdc_hooks.waiters w WHERE NOT EXISTS (SELECT 1 FROM pg_stat_get_activity(w.pid));

-- Relay: sessions, take-over, listener slots (schema version 10) --------------

-- name: register_relay_session
-- A relay's session, on the connection it claims with: the row and its session
-- advisory lock, in one statement (the row shows only once committed, locked).
INSERT INTO cdc_hooks.relay_sessions (pid) VALUES (pg_backend_pid())
RETURNING id, pg_try_advisory_lock(1667523433, mod(id, 2147483648)::int);

-- name: carry_over_session
-- A relay reconnecting: its last session's claims move to its new one, so that
-- what it has queued is still sent and its results in flight still land. Only
-- while that session is still on record and nobody else is taking it over (the
-- transaction lock, as in take_over_sessions); its row is deleted with it.
-- Returns whether it was carried over.
WITH old AS (
    DELETE FROM cdc_hooks.relay_sessions s
    WHERE s.id = %(old)s AND pg_try_advisory_xact_lock(1667523433, mod(s.id, 2147483648)::int)
    RETURNING s.id
), moved AS (
    UPDATE cdc_hooks.deliveries d SET claimed_by = %(session)s
    WHERE d.claimed_by IN (SELECT id FROM old) AND d.status = 'pending'
    RETURNING 1
)
SELECT EXISTS (SELECT FROM old), (SELECT count(*) FROM moved);

-- name: take_over_sessions
-- Sessions whose lock nobody holds have ended (SIGKILL, OOM, lost node,
-- pg_terminate_backend): their rows (and slots) are deleted and their claimed
-- deliveries due at once, their attempt number kept, so that a late result of
-- the old claim is fenced off the next one. Due as of their creation: claims
-- take them before a backlog that fell due since (and the later changes of
-- their rows wait for them). The transaction lock taken to test
-- makes two relays' take-overs of a session one. A claim made for a session
-- already gone (dispatch racing its take-over) is swept with the next one. The
-- deliveries are probed only when a session ended (a one-time filter): at rest
-- this is a read of a few rows. Returns the live sessions and the deliveries
-- made due.
WITH ended AS (
    DELETE FROM cdc_hooks.relay_sessions s
    WHERE s.id <> %(session)s AND pg_try_advisory_xact_lock(1667523433, mod(s.id, 2147483648)::int)
    RETURNING s.id
), freed AS (
    UPDATE cdc_hooks.deliveries d
    SET claimed_by = NULL, next_attempt_at = least(d.created_at, now())
    WHERE EXISTS (SELECT FROM ended)
      AND d.status = 'pending' AND d.claimed_by IS NOT NULL
      AND (d.claimed_by IN (SELECT id FROM ended)
           OR NOT EXISTS (SELECT FROM cdc_hooks.relay_sessions s WHERE s.id = d.claimed_by))
    RETURNING 1
)
SELECT (SELECT count(*) FROM cdc_hooks.relay_sessions) - (SELECT count(*) FROM ended),
       (SELECT count(*) FROM ended), (SELECT count(*) FROM freed);

-- name: take_slots
-- This session's slots per listener (migration 0010, cdc_hooks.take_slots).
SELECT listener_id, slots
FROM cdc_hooks.take_slots(%(session)s, %(listener_ids)s::bigint[], %(wants)s::int[],
                          %(floors)s::int[], %(cap)s);

-- Relay: delivery ------------------------------------------------------------

-- name: claim_deliveries
-- Up to `slots` due deliveries per listener and `total` in all (listeners in
-- the order given: the relay rotates it), each the oldest pending one of its
-- row for that listener (per-row order), claimed by the relay's session and
-- leased for `lease` seconds: a relay whose session ends has its claims taken
-- over at once (take_over_sessions); one hung but connected leaves them to be
-- claimed again when the lease ends.
-- A TRUNCATE's delivery (row_key '*') goes only once no older delivery of its
-- listener is pending, and one queued behind it waits until it ended: nothing of
-- the table sent before a TRUNCATE arrives after it. Only deliveries queued
-- behind pay these probes.
WITH due AS (
    SELECT d.id
    FROM unnest(%(listener_ids)s::bigint[], %(slots)s::int[]) AS l (id, slots)
    CROSS JOIN LATERAL (
        SELECT d.id
        FROM cdc_hooks.deliveries d
        WHERE d.listener_id = l.id AND d.status = 'pending' AND d.next_attempt_at <= now()
          -- queued behind an older delivery of its row: its turn once that one ended
          AND (NOT d.queued_behind OR d.row_key IS NULL OR CASE WHEN d.row_key = '*'
              THEN NOT EXISTS (SELECT FROM cdc_hooks.deliveries e
                               WHERE e.listener_id = l.id AND e.status = 'pending'
                                 AND e.event_id < d.event_id)
              ELSE d.event_id = (
                  -- written as min() so the plan is an index probe whatever the statistics
                  SELECT min(e.event_id) FROM cdc_hooks.deliveries e
                  WHERE e.listener_id = l.id AND e.row_key = d.row_key AND e.status = 'pending')
                AND NOT EXISTS (SELECT FROM cdc_hooks.deliveries e
                                WHERE e.listener_id = l.id AND e.row_key = '*'
                                  AND e.status = 'pending' AND e.event_id < d.event_id)
              END)
        ORDER BY d.next_attempt_at, d.event_id
        LIMIT l.slots
        FOR UPDATE SKIP LOCKED
    ) d
    LIMIT %(total)s
)
UPDATE cdc_hooks.deliveries d
SET next_attempt_at = now() + make_interval(secs => %(lease)s), attempts = d.attempts + 1,
    claimed_by = %(session)s
FROM due, cdc_hooks.events ev
WHERE d.id = due.id AND ev.id = d.event_id
RETURNING d.id, d.event_id, d.listener_id, d.attempts,
          cdc_hooks.event_body(ev.id, ev.hook, ev.kind, ev.occurred_at, ev.body);

-- name: record_results
-- Results of a batch of attempts, as one JSON array of
-- [id, attempt, status, retry_in, code, error, duration_ms, response, session]
-- (one string parameter: psycopg dumps big array parameters slowly); a result
-- whose claim was lost (its session's claims were taken over, or its lease
-- lapsed and another relay claimed the delivery again) only lands in the
-- attempt log: the fence is the attempt number and the claiming session. A first
-- attempt that delivered stays on its delivery (first_try_ms, first_try_response;
-- migration 0014), not in the attempt log.
WITH result AS (
    SELECT (r ->> 0)::bigint AS id, (r ->> 1)::int AS attempt, r ->> 2 AS status,
           (r ->> 3)::float8 AS retry_in, (r ->> 4)::int AS code, r ->> 5 AS error,
           (r ->> 6)::real AS duration_ms, r ->> 7 AS response, (r ->> 8)::bigint AS session,
           (r ->> 1) = '1' AND (r ->> 2) = 'delivered' AS first_try
    FROM json_array_elements(%(results)s::json) AS r
), updated AS (
    UPDATE cdc_hooks.deliveries d
    SET status = r.status, last_status = r.code, last_error = r.error,
        next_attempt_at = CASE WHEN r.status = 'pending'
                               THEN now() + make_interval(secs => r.retry_in) END,
        finished_at = CASE WHEN r.status = 'pending' THEN NULL ELSE now() END,
        first_try_ms = CASE WHEN r.first_try THEN r.duration_ms END,
        first_try_response = CASE WHEN r.first_try THEN r.response END,
        claimed_by = NULL
    FROM result r
    -- = ANY(ARRAY(...)): primary-key probes, never a hash join over every pending
    -- delivery (the plan chosen without statistics)
    WHERE d.id = ANY(ARRAY(SELECT id FROM result))
      AND d.id = r.id AND d.attempts = r.attempt AND d.status = 'pending'
      AND d.claimed_by = r.session
    RETURNING d.id
)
INSERT INTO cdc_hooks.attempts (delivery_id, status_code, duration_ms, error, response)
SELECT id, code, duration_ms, error, response FROM result r
WHERE NOT (r.first_try AND r.id IN (SELECT id FROM updated));

-- name: renew_leases
-- Deliveries a relay holds, queued, not yet sent: leased again, so that the lease
-- cannot lapse while they wait their turn (a claim would take them again). Only
-- while still this relay's (same attempt and session, pending).
UPDATE cdc_hooks.deliveries d
SET next_attempt_at = now() + make_interval(secs => %(lease)s)
FROM unnest(%(ids)s::bigint[], %(attempts)s::int[]) AS r (id, attempt)
-- = ANY: primary-key probes whatever the statistics
WHERE d.id = ANY(%(ids)s::bigint[]) AND d.id = r.id AND d.attempts = r.attempt
  AND d.status = 'pending' AND d.claimed_by = %(session)s;

-- name: release_deliveries
-- Claimed but never sent (relay stopping, listener paused): due again at once,
-- without spending an attempt; only while the session still holds the claim
-- (after a take-over, giving back the attempt would let a late result land
-- over the next claim).
UPDATE cdc_hooks.deliveries
SET next_attempt_at = now(), attempts = attempts - 1, claimed_by = NULL
WHERE id = ANY(%(ids)s::bigint[]) AND status = 'pending' AND claimed_by = %(session)s;

-- name: disable_listener_gone
-- Followed by send_listener_disabled in the same transaction, as when disabled
-- for failing too long (disable_failing_listeners).
UPDATE cdc_hooks.listeners
SET state = 'disabled', disabled_reason = %(reason)s, updated_at = now()
WHERE id = %(id)s AND state <> 'disabled'
RETURNING id, hook, url, disabled_reason;

-- name: send_listener_disabled
-- The event on the built-in hook cdc_hooks.listener_disabled, when installed, of
-- a listener just disabled; its URL with credentials masked (cdc_hooks/urls.py).
SELECT cdc_hooks.send('cdc_hooks.listener_disabled', jsonb_build_object(
           'listener_id', %(id)s::bigint, 'hook', %(hook)s::text, 'url', %(url)s::text,
           'reason', %(reason)s::text))
WHERE EXISTS (SELECT FROM cdc_hooks.hooks WHERE name = 'cdc_hooks.listener_disabled');

-- Relay: shared circuits (cdc_hooks/relay/circuit.py) -------------------------
-- One row per listener that ever failed (migration 0011). Every statement here
-- runs for failures, probes, or successes while a row holds failures: a
-- listener that only succeeds costs none of them.

-- name: circuit_states
-- The circuits a relay must know of (with the listeners, every second): open
-- ones, and those with failures in their window, whose successes must be
-- recorded too (live). Per row: seconds until the probe may go (NULL: closed),
-- whether a relay holds the probe, failures in a row, the last error, the last
-- pause, live, and NULL where record_circuits says what it changed.
SELECT listener_id, extract(epoch FROM open_until - now())::float8,
       coalesce(probe_until > now(), false), failures, last_error, pause, true, NULL::text
FROM cdc_hooks.circuits
WHERE open_until IS NOT NULL OR failures > 0
   OR (failed + prev_failed > 0 AND window_start > now() - make_interval(secs => 2 * %(window)s));

-- name: add_circuits
-- Rows for listeners whose first failure record_circuits is about to count.
INSERT INTO cdc_hooks.circuits (listener_id)
SELECT unnest(%(listener_ids)s::bigint[])
ON CONFLICT (listener_id) DO NOTHING;

-- name: record_circuits
-- A batch of results, per listener, as one JSON array of [listener_id, requests,
-- failed, failed after its last answer, probe ('answered', 'failed' or null),
-- last error]. Each row is read locked and written once (listener order: no
-- deadlock between relays), so concurrent relays add up, never overwrite.
-- The window rolls forward by whole windows; failures in a row open a closed
-- circuit once they reach `threshold` and the failure rate, over the last
-- `window` seconds, reaches `rate`; a failed probe opens it again for twice
-- as long (up to `max_pause`); any answer closes it. Returns what
-- circuit_states does, with what this batch changed (transition).
WITH batch AS (
    SELECT (r ->> 0)::bigint AS listener_id, (r ->> 1)::int AS requests, (r ->> 2)::int AS failed,
           (r ->> 3)::int AS trailing, r ->> 4 AS probe, r ->> 5 AS error
    FROM json_array_elements(%(batch)s::json) AS r
), old AS (
    SELECT c.* FROM cdc_hooks.circuits c
    WHERE c.listener_id IN (SELECT listener_id FROM batch)
    ORDER BY c.listener_id
    FOR UPDATE
), counted AS (
    SELECT o.listener_id, o.open_until, o.pause, b.probe,
           coalesce(b.error, o.last_error) AS last_error,
           CASE WHEN b.failed = b.requests THEN o.failures + b.failed ELSE b.trailing END AS failures,
           b.requests > b.failed AS answered,
           w.start, w.requests + b.requests AS requests, w.failed + b.failed AS failed,
           w.prev_requests, w.prev_failed,
           greatest(0.0, 1.0 - extract(epoch FROM now() - w.start) / %(window)s) AS prev_weight
    FROM old o
    JOIN batch b USING (listener_id)
    CROSS JOIN LATERAL (
        SELECT v.start, v.requests, v.failed, v.prev_requests, v.prev_failed
        FROM (VALUES (0, o.window_start, o.requests, o.failed, o.prev_requests, o.prev_failed),
                     (1, o.window_start + make_interval(secs => %(window)s), 0, 0, o.requests, o.failed),
                     (2, now(), 0, 0, 0, 0))
             AS v (k, start, requests, failed, prev_requests, prev_failed)
        WHERE v.k = CASE WHEN now() < o.window_start + make_interval(secs => %(window)s) THEN 0
                         WHEN now() < o.window_start + make_interval(secs => 2 * %(window)s) THEN 1
                         ELSE 2 END
    ) w
), decided AS (
    SELECT c.*,
           CASE WHEN c.open_until IS NOT NULL AND c.answered THEN 'closed'
                WHEN c.open_until IS NOT NULL AND c.probe = 'failed' THEN 'reopened'
                WHEN c.open_until IS NULL AND c.failures >= %(threshold)s
                     AND c.failed + c.prev_failed * c.prev_weight
                         >= %(rate)s * (c.requests + c.prev_requests * c.prev_weight)
                THEN 'opened' END AS transition
    FROM counted c
)
UPDATE cdc_hooks.circuits c
SET failures = d.failures, window_start = d.start, requests = d.requests, failed = d.failed,
    prev_requests = d.prev_requests, prev_failed = d.prev_failed, last_error = d.last_error,
    transition = d.transition,
    pause = CASE d.transition WHEN 'closed' THEN 0
                              WHEN 'opened' THEN %(first_pause)s
                              WHEN 'reopened' THEN least(%(max_pause)s, greatest(d.pause * 2, %(first_pause)s))
                              ELSE d.pause END,
    open_until = CASE d.transition WHEN 'closed' THEN NULL
                                   WHEN 'opened' THEN now() + make_interval(secs => %(first_pause)s)
                                   WHEN 'reopened' THEN now() + make_interval(secs =>
                                       least(%(max_pause)s, greatest(d.pause * 2, %(first_pause)s)))
                                   ELSE d.open_until END,
    -- the probe's result ends its lease, and so does any change of state
    probe_until = CASE WHEN d.transition IS NULL AND d.probe IS NULL THEN c.probe_until END
FROM decided d
WHERE c.listener_id = d.listener_id
RETURNING c.listener_id, extract(epoch FROM c.open_until - now())::float8,
          coalesce(c.probe_until > now(), false), c.failures, c.last_error, c.pause,
          c.open_until IS NOT NULL OR c.failures > 0 OR c.failed + c.prev_failed > 0, d.transition;

-- name: take_probes
-- Open circuits whose pause is over and whose probe no relay holds, among the
-- given listeners, with a delivery due to send as the probe: this relay holds
-- their probe for `lease` seconds (a compare-and-swap: of relays asking at once,
-- one gets it). Returns their listener ids.
UPDATE cdc_hooks.circuits c
SET probe_until = now() + make_interval(secs => %(lease)s)
WHERE c.listener_id = ANY(%(listener_ids)s::bigint[]) AND c.open_until <= now()
  AND (c.probe_until IS NULL OR c.probe_until <= now())
  AND EXISTS (SELECT FROM cdc_hooks.deliveries d
              WHERE d.listener_id = c.listener_id AND d.status = 'pending'
                AND d.next_attempt_at <= now())
RETURNING c.listener_id;

-- name: release_probes
-- Probes taken but not sent (nothing claimable, relay stopping): another relay may take them.
UPDATE cdc_hooks.circuits SET probe_until = NULL
WHERE listener_id = ANY(%(listener_ids)s::bigint[]);

-- name: reset_circuit
-- A listener resumed or given another URL starts with a closed circuit.
DELETE FROM cdc_hooks.circuits WHERE listener_id = %(id)s;

-- name: next_due
-- When the next pending delivery of the given listeners falls due within
-- `within` seconds (NULL: none does), and whether some are due already (after a
-- claim: they wait behind an older one of their row, and that one's result
-- releases them). Two short index range probes per listener, never a scan of
-- the backlog (this runs after most claims): deliveries in flight, leased far
-- ahead, and the dead index entries they leave behind are outside the ranges.
SELECT extract(epoch FROM min(later.next_attempt_at) - now()), bool_or(due.id IS NOT NULL)
FROM unnest(%(listener_ids)s::bigint[]) AS l (id)
LEFT JOIN LATERAL (
    SELECT d.next_attempt_at FROM cdc_hooks.deliveries d
    WHERE d.listener_id = l.id AND d.status = 'pending' AND d.next_attempt_at > now()
      AND d.next_attempt_at <= now() + make_interval(secs => %(within)s)
    ORDER BY d.next_attempt_at LIMIT 1
) later ON true
LEFT JOIN LATERAL (
    SELECT d.id FROM cdc_hooks.deliveries d
    WHERE d.listener_id = l.id AND d.status = 'pending' AND d.next_attempt_at <= now()
    -- ordered, so the plan is the index (a LIMIT 1 alone invited a sequential scan)
    ORDER BY d.next_attempt_at LIMIT 1
) due ON true;

-- Relay: rate limits (cdc_hooks/relay/pacing.py; schema version 12) ----------

-- name: reserve_sends
-- The next `seconds` of each rate-limited listener's sending (n slots of
-- 1 / rate seconds), reserved for this relay in one statement: they start where
-- the slots reserved so far end, or now if that has passed. Returns, per
-- listener still there, in how many seconds its reservation ends by the
-- database's clock (relays' clocks need not agree). Rows are locked in id
-- order, the same in every relay: two relays' reservations cannot deadlock.
INSERT INTO cdc_hooks.listener_pace AS p (listener_id, next_at)
SELECT l.id, now() + make_interval(secs => w.seconds)
FROM unnest(%(ids)s::bigint[], %(seconds)s::float8[]) AS w (id, seconds)
JOIN cdc_hooks.listeners l ON l.id = w.id
ORDER BY l.id
ON CONFLICT (listener_id) DO UPDATE
-- excluded.next_at - now(): this reservation's length
SET next_at = greatest(p.next_at, now()) + (excluded.next_at - now())
RETURNING p.listener_id, extract(epoch FROM p.next_at - now())::float8;

-- Deliveries: inspection and redelivery --------------------------------------

-- name: delivery_attempts
-- The view attempt_log: the attempt log and first attempts that delivered (0014).
SELECT attempted_at, status_code, duration_ms, error, response
FROM cdc_hooks.attempt_log WHERE delivery_id = %(id)s ORDER BY attempted_at;

-- name: redeliver
-- Back to pending, due now, with a fresh attempt budget; keeps its webhook-id. A
-- first attempt that delivered, kept on the delivery, moves to the attempt log.
WITH chosen AS (
    SELECT id, finished_at, last_status, last_error, first_try_ms, first_try_response
    FROM cdc_hooks.deliveries
    WHERE status <> 'pending'
      AND (%(id)s::bigint IS NULL OR id = %(id)s)
      AND (%(listener_id)s::bigint IS NULL OR listener_id = %(listener_id)s)
      AND (%(since)s::timestamptz IS NULL OR created_at >= %(since)s)
      AND (%(only_dead)s = false OR status = 'dead')
    FOR UPDATE
), logged AS (
    INSERT INTO cdc_hooks.attempts (delivery_id, attempted_at, status_code, duration_ms, error,
                                    response)
    SELECT id, finished_at, last_status, first_try_ms, last_error, first_try_response
    FROM chosen WHERE first_try_ms IS NOT NULL
)
UPDATE cdc_hooks.deliveries d
SET status = 'pending', attempts = 0, next_attempt_at = now(), finished_at = NULL,
    first_try_ms = NULL, first_try_response = NULL
FROM chosen
WHERE d.id = chosen.id
RETURNING d.id;

-- name: status
SELECT (SELECT count(*) FROM cdc_hooks.outbox) AS outbox_chunks,
       (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'pending') AS pending,
       (SELECT extract(epoch FROM now() - min(occurred_at))::float8 FROM cdc_hooks.outbox) AS oldest_outbox_age,
       (SELECT extract(epoch FROM now() - min(created_at))::float8
          FROM cdc_hooks.deliveries WHERE status = 'pending') AS oldest_pending_age,
       (SELECT count(*) FROM cdc_hooks.deliveries
          WHERE status = 'delivered' AND finished_at > now() - make_interval(mins => %(minutes)s)) AS delivered,
       (SELECT count(*) FROM cdc_hooks.attempts
          WHERE (status_code IS NULL OR status_code >= 300)
            AND attempted_at > now() - make_interval(mins => %(minutes)s)) AS failed_attempts,
       (SELECT count(*) FROM cdc_hooks.deliveries WHERE status = 'dead') AS dead;

-- name: held_listeners
-- Listeners not active (paused or disabled), with why: status lists them.
SELECT id, hook, url, state, disabled_reason
FROM cdc_hooks.listeners WHERE state <> 'active' ORDER BY id;

-- name: failing_listeners
SELECT l.id, l.hook, l.url, l.state, l.disabled_reason,
       count(*) FILTER (WHERE d.status = 'dead') AS dead,
       count(*) FILTER (WHERE d.status = 'pending' AND d.attempts > 0) AS retrying
FROM cdc_hooks.listeners l
JOIN cdc_hooks.deliveries d ON d.listener_id = l.id
WHERE d.status = 'dead' OR (d.status = 'pending' AND d.attempts > 0) OR l.state = 'disabled'
GROUP BY l.id
ORDER BY l.id;

-- Listings ---------------------------------------------------------------------
-- Read-only queries of the service layer (cdc_hooks/services), shown alike by
-- the CLI, the REST API and the pages; every change goes through the queries above.

-- name: hook_activity
-- Per installed hook: its listeners and what they were delivered in the last hour.
WITH recent AS (
    SELECT l.hook, count(*) AS delivered
    FROM cdc_hooks.deliveries d
    JOIN cdc_hooks.listeners l ON l.id = d.listener_id
    WHERE d.status = 'delivered' AND d.finished_at > now() - interval '1 hour'
    GROUP BY l.hook
)
SELECT h.name, (SELECT count(*) FROM cdc_hooks.listeners l WHERE l.hook = h.name) AS listeners,
       coalesce(r.delivered, 0) AS delivered_last_hour
FROM cdc_hooks.hooks h
LEFT JOIN recent r ON r.hook = h.name
ORDER BY h.name;

-- name: listener_stats
-- Outcomes of each listener's last 1000 deliveries (bounded by the
-- (listener_id, id) index, so a listener with millions costs the same).
SELECT l.id,
       count(r.status) FILTER (WHERE r.status = 'delivered') AS delivered,
       count(r.status) FILTER (WHERE r.status = 'dead') AS dead,
       count(r.status) FILTER (WHERE r.status = 'pending' AND r.attempts > 0) AS retrying,
       count(r.status) FILTER (WHERE r.status = 'pending' AND r.attempts = 0) AS queued
FROM cdc_hooks.listeners l
LEFT JOIN LATERAL (
    SELECT d.status, d.attempts FROM cdc_hooks.deliveries d
    WHERE d.listener_id = l.id
    ORDER BY d.id DESC LIMIT 1000
) r ON true
WHERE %(id)s::bigint IS NULL OR l.id = %(id)s
GROUP BY l.id
ORDER BY l.id;

-- name: deliveries
-- A page of deliveries, newest first; `before` (a delivery id) is the cursor. Every
-- interface lists with it (services/deliveries.py).
-- latency_ms: from the change's commit to the delivery's end; next_attempt_at only
-- while pending (one finished before schema version 14 kept its last lease's).
SELECT d.id, d.event_id, d.listener_id, ev.hook, ev.kind, d.status, d.attempts,
       d.last_status AS last_code, d.last_error, d.created_at, d.finished_at,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       coalesce(d.first_try_ms, a.duration_ms) AS duration_ms,
       (extract(epoch FROM d.finished_at - ev.occurred_at) * 1000)::float8 AS latency_ms
FROM cdc_hooks.deliveries d
JOIN cdc_hooks.events ev ON ev.id = d.event_id
LEFT JOIN LATERAL (
    -- a first attempt that delivered is its only one, on the delivery (0014)
    SELECT a.duration_ms FROM cdc_hooks.attempts a
    WHERE a.delivery_id = d.id AND d.first_try_ms IS NULL ORDER BY a.attempted_at DESC LIMIT 1
) a ON true
WHERE (%(status)s::text IS NULL OR d.status = %(status)s)
  AND (%(listener_id)s::bigint IS NULL OR d.listener_id = %(listener_id)s)
  AND (%(hook)s::text IS NULL OR ev.hook = %(hook)s)
  AND (%(since)s::timestamptz IS NULL OR d.created_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR d.created_at < %(until)s)
  AND (%(before)s::bigint IS NULL OR d.id < %(before)s)
ORDER BY d.id DESC
LIMIT %(limit)s;

-- name: delivery
-- One delivery with what deliveries shows, plus its listener's URL and the body.
SELECT d.id, d.event_id, d.listener_id, ev.hook, ev.kind, d.status, d.attempts,
       d.last_status AS last_code, d.last_error, d.created_at, d.finished_at,
       CASE WHEN d.status = 'pending' THEN d.next_attempt_at END AS next_attempt_at,
       coalesce(d.first_try_ms, a.duration_ms) AS duration_ms,
       (extract(epoch FROM d.finished_at - ev.occurred_at) * 1000)::float8 AS latency_ms,
       l.url, cdc_hooks.event_body(ev.id, ev.hook, ev.kind, ev.occurred_at, ev.body) AS body
FROM cdc_hooks.deliveries d
JOIN cdc_hooks.events ev ON ev.id = d.event_id
LEFT JOIN cdc_hooks.listeners l ON l.id = d.listener_id
LEFT JOIN LATERAL (
    SELECT a.duration_ms FROM cdc_hooks.attempts a
    WHERE a.delivery_id = d.id AND d.first_try_ms IS NULL ORDER BY a.attempted_at DESC LIMIT 1
) a ON true
WHERE d.id = %(id)s;

-- name: recent_events
-- A hook's last events, newest first: what a new listener's filter is previewed on
-- (by the primary key backwards, or events_by_hook for a rarer hook).
SELECT id, kind, cdc_hooks.event_body(id, hook, kind, occurred_at, body) AS body, occurred_at
FROM cdc_hooks.events
WHERE hook = %(hook)s
ORDER BY id DESC
LIMIT %(limit)s;

-- name: timeline
-- Per minute of the last `minutes`: deliveries delivered and attempts that failed.
WITH minutes AS (
    SELECT generate_series(date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1),
                           date_trunc('minute', now()), interval '1 minute') AS minute
), ok AS (
    SELECT date_trunc('minute', finished_at) AS minute, count(*) AS n
    FROM cdc_hooks.deliveries
    WHERE status = 'delivered'
      AND finished_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
    GROUP BY 1
), failed AS (
    SELECT date_trunc('minute', attempted_at) AS minute, count(*) AS n
    FROM cdc_hooks.attempts
    WHERE (status_code IS NULL OR status_code >= 300)
      AND attempted_at >= date_trunc('minute', now()) - make_interval(mins => %(minutes)s - 1)
    GROUP BY 1
)
SELECT m.minute AS at, coalesce(ok.n, 0) AS delivered, coalesce(failed.n, 0) AS failed
FROM minutes m
LEFT JOIN ok ON ok.minute = m.minute
LEFT JOIN failed ON failed.minute = m.minute
ORDER BY m.minute;

-- Web sessions (cdc_hooks/web/sessions.py; schema version 5) ---------------------
-- A session is found by the SHA-256 of its cookie's id, and only while it has not
-- expired and the token is still the one it logged in with (login: its tag).

-- name: web_session
SELECT csrf, flash FROM cdc_hooks.web_sessions
WHERE id_hash = %(id_hash)s AND login = %(login)s AND expires_at > now();

-- name: start_web_session
INSERT INTO cdc_hooks.web_sessions (id_hash, login, csrf, expires_at)
VALUES (%(id_hash)s, %(login)s, %(csrf)s, now() + make_interval(secs => %(seconds)s));

-- name: end_web_session
DELETE FROM cdc_hooks.web_sessions WHERE id_hash = %(id_hash)s;

-- name: set_web_session_flash
UPDATE cdc_hooks.web_sessions SET flash = %(flash)s WHERE id_hash = %(id_hash)s;

-- name: prune_web_sessions
DELETE FROM cdc_hooks.web_sessions WHERE expires_at <= now();

-- Metrics ----------------------------------------------------------------------
-- Read at each /metrics scrape (cdc_hooks/metrics.py), so it must stay cheap.

-- name: metrics_backlog
-- One row per listener (one row of NULLs if there are none), each carrying the
-- outbox figures too. Pending counts and the oldest pending event come from
-- the pending-only index deliveries_due (an index-only scan of the backlog,
-- not of the delivered history); the outbox's oldest row is a primary key probe.
WITH pending AS (
    SELECT listener_id, count(*) AS pending, min(event_id) AS oldest_event
    FROM cdc_hooks.deliveries
    WHERE status = 'pending'
    GROUP BY listener_id
), outbox AS (
    SELECT (SELECT count(*) FROM cdc_hooks.outbox) AS rows,
           extract(epoch FROM now() - (SELECT occurred_at FROM cdc_hooks.outbox ORDER BY id LIMIT 1))::float8
               AS oldest_age
)
SELECT l.id, l.hook, l.state, coalesce(p.pending, 0) AS pending,
       o.rows AS outbox_rows, o.oldest_age AS outbox_oldest_age,
       extract(epoch FROM now() - ev.occurred_at)::float8 AS oldest_pending_age
FROM outbox o
LEFT JOIN cdc_hooks.listeners l ON true
LEFT JOIN pending p ON p.listener_id = l.id
LEFT JOIN cdc_hooks.events ev ON ev.id = p.oldest_event
ORDER BY l.id;

-- ============================================================================
-- Operations (issue 7): retention, listener health, backfill. Schema version 2
-- (sql/migrations/0002_operations.sql). cdc_hooks/retention.py, health.py and
-- backfill.py run these; docs/operations.md says what they do.
-- ============================================================================

-- name: try_lock_maintenance
-- One pruner at a time (relays and `cdc-hooks prune`). A session lock: every
-- prune batch commits on its own. Released by unlock_maintenance, or when the
-- session ends.
SELECT pg_try_advisory_lock(hashtext('cdc_hooks.maintenance'));

-- name: unlock_maintenance
SELECT pg_advisory_unlock(hashtext('cdc_hooks.maintenance'));

-- name: listener_ids
SELECT id FROM cdc_hooks.listeners ORDER BY id;

-- name: prune_deliveries
-- Up to `batch` of one listener's deliveries with `status` (delivered or dead)
-- that finished more than `seconds` ago (index deliveries_finished). The outer
-- conditions repeat the inner ones: a dead letter redelivered meanwhile is
-- pending again, and the recheck on the row's new version spares it.
WITH gone AS (
    DELETE FROM cdc_hooks.deliveries
    WHERE id IN (SELECT id FROM cdc_hooks.deliveries
                 WHERE listener_id = %(listener_id)s AND status = %(status)s
                   AND finished_at < now() - make_interval(secs => %(seconds)s)
                 LIMIT %(batch)s)
      AND status = %(status)s AND finished_at < now() - make_interval(secs => %(seconds)s)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: prune_attempts
-- Up to `batch` attempt log rows older than `seconds` (index attempts_by_time).
-- By ctid: the attempt log has no key, and its rows are never updated.
WITH gone AS (
    DELETE FROM cdc_hooks.attempts
    WHERE ctid = ANY(ARRAY(SELECT ctid FROM cdc_hooks.attempts
                           WHERE attempted_at < now() - make_interval(secs => %(seconds)s)
                           LIMIT %(batch)s))
      AND attempted_at < now() - make_interval(secs => %(seconds)s)
    RETURNING 1
)
SELECT count(*) FROM gone;

-- name: prune_events
-- The next `batch` events by id after `after`: those older than `seconds` that
-- no delivery refers to are deleted. Returns the last id scanned, how many were
-- deleted, and how many were old (none: the scan has reached recent events, as
-- ids grow with time). A window by id rather than a search for deletable
-- events, so events kept by dead letters are scanned once per prune, not once
-- per batch.
WITH scanned AS (
    SELECT id, occurred_at < now() - make_interval(secs => %(seconds)s) AS old
    FROM cdc_hooks.events
    WHERE id > %(after)s
    ORDER BY id
    LIMIT %(batch)s
), gone AS (
    DELETE FROM cdc_hooks.events e
    USING scanned s
    WHERE e.id = s.id AND s.old
      AND NOT EXISTS (SELECT FROM cdc_hooks.deliveries d WHERE d.event_id = e.id)
    RETURNING 1
)
SELECT (SELECT max(id) FROM scanned), (SELECT count(*) FROM gone),
       (SELECT count(*) FROM scanned WHERE old);

-- name: check_listener_health
-- Each active listener's health since the previous check: a delivery succeeded
-- (ends a failure streak), or deliveries are failing (one waits for a retry, one
-- was given up, or its circuit is open). failing_since: when a check first saw it failing with no
-- success since; failing: whether the latest check did.
WITH seen AS (
    SELECT l.id, h.failing_since,
           EXISTS (SELECT FROM cdc_hooks.deliveries d
                   WHERE d.listener_id = l.id AND d.status = 'delivered'
                     AND d.finished_at > coalesce(h.checked_at, '-infinity')) AS succeeded,
           EXISTS (SELECT FROM cdc_hooks.deliveries d
                   WHERE d.listener_id = l.id AND d.status = 'pending' AND d.attempts > 0
                     AND d.next_attempt_at > now())
           OR EXISTS (SELECT FROM cdc_hooks.deliveries d
                      WHERE d.listener_id = l.id AND d.status = 'dead'
                        AND d.finished_at > coalesce(h.checked_at, '-infinity'))
           -- its circuit is open: due deliveries wait for the probe, no attempt recorded
           OR EXISTS (SELECT FROM cdc_hooks.circuits c
                      WHERE c.listener_id = l.id AND c.open_until IS NOT NULL) AS failing
    FROM cdc_hooks.listeners l
    LEFT JOIN cdc_hooks.listener_health h ON h.listener_id = l.id
    WHERE l.state = 'active'
)
INSERT INTO cdc_hooks.listener_health AS h (listener_id, failing_since, failing, checked_at)
SELECT id,
       CASE WHEN succeeded THEN NULL
            WHEN failing THEN coalesce(failing_since, now())
            ELSE failing_since END,
       failing AND NOT succeeded, now()
FROM seen
ON CONFLICT (listener_id) DO UPDATE
SET failing_since = excluded.failing_since, failing = excluded.failing,
    checked_at = excluded.checked_at;

-- name: forget_listener_health
-- Rows of listeners removed since.
DELETE FROM cdc_hooks.listener_health h
WHERE NOT EXISTS (SELECT FROM cdc_hooks.listeners l WHERE l.id = h.listener_id);

-- name: forget_circuits
-- Circuits of listeners removed since.
DELETE FROM cdc_hooks.circuits c
WHERE NOT EXISTS (SELECT FROM cdc_hooks.listeners l WHERE l.id = c.listener_id);

-- name: disable_failing_listeners
-- Active listeners failing still, with no success for `seconds` and unchanged
-- (created, resumed, edited) for as long, are disabled; each gets its
-- send_listener_disabled event in the same transaction.
UPDATE cdc_hooks.listeners l
SET state = 'disabled', disabled_reason = %(reason)s, updated_at = now()
FROM cdc_hooks.listener_health h
WHERE h.listener_id = l.id AND l.state = 'active' AND h.failing
  AND h.failing_since < now() - make_interval(secs => %(seconds)s)
  AND l.updated_at < now() - make_interval(secs => %(seconds)s)
RETURNING l.id, l.hook, l.url, l.disabled_reason;

-- name: resume_listener_deliveries
-- On resume: pending deliveries waiting for a retry more than 20 minutes out
-- are due now, with a fresh attempt budget. Claimed ones (claimed_by) are requests
-- in flight or queued in a relay, whatever their lease: those are left alone.
UPDATE cdc_hooks.deliveries
SET next_attempt_at = now(), attempts = 0
WHERE listener_id = %(id)s AND status = 'pending' AND claimed_by IS NULL
  AND next_attempt_at > now() + interval '20 minutes';

-- name: wake_relay
SELECT cdc_hooks.wake_relay();

-- name: backfill_find
-- The unfinished backfill of this hook, condition and listener, if any.
SELECT id, key_columns, last_key, rows_done
FROM cdc_hooks.backfills
WHERE hook = %(hook)s AND coalesce(condition, '') = coalesce(%(condition)s, '')
  AND coalesce(listener_id, 0) = coalesce(%(listener_id)s::bigint, 0)
  AND finished_at IS NULL;

-- name: backfill_start
INSERT INTO cdc_hooks.backfills (hook, condition, listener_id, key_columns)
VALUES (%(hook)s, %(condition)s, %(listener_id)s, %(key_columns)s)
RETURNING id;

-- name: backfill_progress
UPDATE cdc_hooks.backfills
SET last_key = %(last_key)s, rows_done = rows_done + %(rows)s, updated_at = now()
WHERE id = %(id)s;

-- name: backfill_finish
UPDATE cdc_hooks.backfills SET finished_at = now(), updated_at = now() WHERE id = %(id)s;

-- name: backfill_forget
DELETE FROM cdc_hooks.backfills WHERE id = %(id)s;

-- name: read_only_transaction
-- The --where probes of a backfill run in a read-only transaction, rolled back.
SET TRANSACTION READ ONLY;

-- name: probe_timeout
SET LOCAL statement_timeout = '10s';

-- name: autovacuum_on
-- Pruned space is reused only once vacuumed: `cdc-hooks prune` warns without autovacuum.
SELECT current_setting('autovacuum')::boolean;

-- name: foreign_json_casts
-- Casts to json or jsonb whose function belongs to a role that is neither a
-- superuser nor one whose rights the current user has anyway (a superuser has
-- every role's, yet must not run theirs): backfill refuses to convert values then.
SELECT format_type(c.castsource, NULL), owner.rolname
FROM pg_cast c
JOIN pg_proc p ON p.oid = c.castfunc
JOIN pg_roles owner ON owner.oid = p.proowner
JOIN pg_roles me ON me.rolname = current_user
WHERE c.casttarget IN ('json'::regtype, 'jsonb'::regtype)
  AND NOT owner.rolsuper AND owner.oid <> me.oid
  AND (me.rolsuper OR NOT pg_has_role(me.oid, owner.oid, 'USAGE'))
ORDER BY 1;

-- name: row_security_off
SET LOCAL row_security = off;

-- name: current_user
SELECT current_user;
