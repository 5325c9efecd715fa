-- Version 10 of the cdc_hooks schema: a relay's claims belong to its database
-- session (fast failover with fencing), and listener_concurrency holds across
-- every relay of the database (issue 14).
--
-- A relay registers a row here when it connects and, on the connection it
-- claims with, holds the session advisory lock (1667523433, id) for as long as
-- that session lives. A SIGKILL, an OOM kill, a lost node or pg_terminate_backend
-- ends the session and with it the lock: any relay (cdc_hooks/relay/relay.py,
-- TAKEOVER_EVERY) then finds the lock free, deletes the row and makes the
-- session's claimed deliveries due at once, keeping their attempt number.
-- 1667523433 is 'cdci' (1667523432, 'cdch', is the waiters' lock).
CREATE TABLE cdc_hooks.relay_sessions (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    pid         int NOT NULL,   -- backend of the claiming connection, for operators
    started_at  timestamptz NOT NULL DEFAULT now()
);

-- The session holding a pending delivery's claim (NULL: none). A result, a
-- release or a lease renewal lands only while its session still holds the
-- claim, so a relay that lost its session cannot record over a newer claim.
-- No index: take-overs are rare and probe pending deliveries only.
ALTER TABLE cdc_hooks.deliveries ADD COLUMN claimed_by bigint;

-- listener_concurrency for all relays together: each relay session holds some
-- of a listener's slots (requests it may have in flight to it); their sum never
-- exceeds the listener_concurrency of the relay that took the last ones. A
-- session's slots go with it (take-over deletes the row), a listener's with it.
CREATE TABLE cdc_hooks.listener_slots (
    listener_id  bigint NOT NULL REFERENCES cdc_hooks.listeners ON DELETE CASCADE,
    session_id   bigint NOT NULL REFERENCES cdc_hooks.relay_sessions ON DELETE CASCADE,
    slots        int NOT NULL CHECK (slots > 0),
    PRIMARY KEY (listener_id, session_id)
);
CREATE INDEX listener_slots_by_session ON cdc_hooks.listener_slots (session_id);

-- A session's slots of each listener given: as many as it wants (at most an
-- even share of `cap` among the live sessions, rounded up), as far as the other
-- sessions leave free, and never fewer than `floors` (its requests in flight,
-- which it had slots for). 0 slots: the row is deleted. One listener at a time
-- under a transaction lock, in id order (no deadlock): each statement of a
-- volatile function sees what the previous holder of the lock committed.
CREATE FUNCTION cdc_hooks.take_slots(relay_session bigint, listener_ids bigint[], wants int[],
                                     floors int[], cap int)
RETURNS TABLE (listener_id bigint, slots int)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    fair_share int := ceil(cap::numeric / greatest(1, (SELECT count(*) FROM cdc_hooks.relay_sessions)));
    wanted int;
    floor_slots int;
    others int;
BEGIN
    FOR listener_id, wanted, floor_slots IN
            SELECT * FROM unnest(listener_ids, wants, floors) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(1667523434, mod(listener_id, 2147483648)::int);
        SELECT coalesce(sum(s.slots), 0) INTO others FROM cdc_hooks.listener_slots s
        WHERE s.listener_id = take_slots.listener_id AND s.session_id <> relay_session;
        slots := greatest(floor_slots, least(wanted, fair_share, cap - others));
        IF slots > 0 THEN
            INSERT INTO cdc_hooks.listener_slots AS s (listener_id, session_id, slots)
            SELECT take_slots.listener_id, relay_session, take_slots.slots
            WHERE EXISTS (SELECT FROM cdc_hooks.listeners l WHERE l.id = take_slots.listener_id)
            ON CONFLICT ON CONSTRAINT listener_slots_pkey DO UPDATE SET slots = excluded.slots;
        ELSE
            DELETE FROM cdc_hooks.listener_slots s
            WHERE s.listener_id = take_slots.listener_id AND s.session_id = relay_session;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;
