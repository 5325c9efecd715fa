-- Version 5 of the cdc_hooks schema: the web interface's sessions, kept here
-- rather than in a cookie signed with a key derived from the token (anyone could
-- fetch such a cookie from the login page and test token guesses against it
-- offline; and logging out could not end a copy of it). The cookie carries only
-- a random id; logging out deletes the row, for every web process at once.
-- Expired sessions are deleted at each login. Only the web interface uses this
-- table (it runs as the schema's owner): the relay's role needs no right on it.
CREATE TABLE cdc_hooks.web_sessions (
    id_hash     bytea PRIMARY KEY,  -- SHA-256 of the cookie's id: the table opens no session
    login       text NOT NULL,      -- tag of the token it logged in with (scrypt): a new token ends it
    csrf        text NOT NULL,      -- carried by every form of the session
    flash       text,               -- a message for the next page, then cleared
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);
