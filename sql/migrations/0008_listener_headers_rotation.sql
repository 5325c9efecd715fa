-- Version 8 of the cdc_hooks schema: delivery controls of a listener (issue 15).
-- headers: its own HTTP headers sent with every delivery (e.g. an API key);
-- secrets like the signing secret, so never listed (only their names are).
-- previous_secret: the secret a rotation replaced, which still signs every
-- delivery beside the new one until previous_secret_until, so that a receiver
-- can switch secrets without losing a delivery; ignored once that has passed.
ALTER TABLE cdc_hooks.listeners
    ADD COLUMN headers                jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN previous_secret        text,
    ADD COLUMN previous_secret_until  timestamptz;
