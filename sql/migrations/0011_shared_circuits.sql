-- Version 11 of the cdc_hooks schema: each listener's circuit breaker is one
-- row shared by every relay and worker of the database (cdc_hooks/relay/circuit.py).
--
-- A row appears with a listener's first failed request and stays. Relays write
-- it only for failures, probes, and successes while it holds failures (a
-- listener that only succeeds never writes it), each batch of results as one
-- read-modify-write under the row's lock (queries record_circuits and
-- add_circuits), so N relays open it after [delivery] circuit_breaker failures
-- in total, and one probe lease (take_probes) lets exactly one relay send the
-- probe. While open_until is set, claims skip the listener: its due deliveries
-- wait for the probe without spending an attempt.
CREATE TABLE cdc_hooks.circuits (
    listener_id     bigint PRIMARY KEY,
    failures        int NOT NULL DEFAULT 0,  -- requests in a row without a usable answer
    -- Requests and failures of the current window ([delivery] circuit_window seconds
    -- from window_start) and of the one before: the failure rate weighs the previous
    -- window by how much of it still lies within circuit_window of now.
    window_start    timestamptz NOT NULL DEFAULT now(),
    requests        int NOT NULL DEFAULT 0,
    failed          int NOT NULL DEFAULT 0,
    prev_requests   int NOT NULL DEFAULT 0,
    prev_failed     int NOT NULL DEFAULT 0,
    open_until      timestamptz,             -- NULL: closed; else the probe may go from then on
    pause           real NOT NULL DEFAULT 0, -- seconds it stayed open the last time
    probe_until     timestamptz,             -- a relay holds the probe until then
    last_error      text,
    transition      text                     -- what the latest update did: opened, reopened, closed
                    CHECK (transition IN ('opened', 'reopened', 'closed'))
);
