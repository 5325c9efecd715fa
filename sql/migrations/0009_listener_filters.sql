-- Version 9 of the cdc_hooks schema: per-listener event kinds and changed-column
-- filters (cdc_hooks/listeners.py validates them; the relay's dispatch applies them).
--
-- events: the event kinds a listener takes (NULL: every event of its hook).
-- changed: an update reaches the listener only if one of these provided columns
-- changed (NULL: any update).
ALTER TABLE cdc_hooks.listeners ADD COLUMN events text[], ADD COLUMN changed text[];
