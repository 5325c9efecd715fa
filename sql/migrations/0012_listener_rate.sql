-- Version 12 of the cdc_hooks schema: a listener's rate limit (issue 15, item 4).
--
-- rate: at most this many deliveries per second to the listener, across every
-- relay and worker of the database (NULL: no limit).
-- listener_pace: where the send slots reserved so far end, per rate-limited
-- listener. A relay about to send to one reserves the next few slots with one
-- statement (reserve_sends moves next_at by n / rate from max(next_at, now)) and
-- sends at those times (cdc_hooks/relay/pacing.py): relays share the rate without
-- talking to each other. Not on listeners: a change of that table wakes every relay
-- to reload it.
ALTER TABLE cdc_hooks.listeners ADD COLUMN rate float8 CHECK (rate > 0);

CREATE TABLE cdc_hooks.listener_pace (
    listener_id  bigint PRIMARY KEY REFERENCES cdc_hooks.listeners (id) ON DELETE CASCADE,
    next_at      timestamptz NOT NULL
);
