-- The SQL of `cdc-hooks demo`, loaded by cdc_hooks.demo: each starts with "-- name: NAME".
-- The demo works in a schema of its own, so it never touches an application's tables.

-- name: server_version
SHOW server_version;

-- name: create_schema
DROP SCHEMA IF EXISTS cdc_hooks_demo CASCADE;
CREATE SCHEMA cdc_hooks_demo;
-- durian's Person: name and address go to listeners, secret must never leave.
CREATE TABLE cdc_hooks_demo.person (
    id      serial PRIMARY KEY,
    name    text NOT NULL,
    address text NOT NULL DEFAULT '',
    secret  text NOT NULL DEFAULT ''
);

-- name: drop_schema
DROP SCHEMA IF EXISTS cdc_hooks_demo CASCADE;

-- name: insert_people
INSERT INTO cdc_hooks_demo.person (name, address, secret) VALUES
    ('Joe', '12 Elm Street', %(joe)s),
    ('Jane', '7 Oak Avenue', %(jane)s),
    ('Bob', '3 Pine Road', %(bob)s);

-- name: move_joe
UPDATE cdc_hooks_demo.person SET address = '1 River Lane' WHERE name = 'Joe';

-- name: change_jane_secret
UPDATE cdc_hooks_demo.person SET secret = %(secret)s WHERE name = 'Jane';

-- name: delete_bob
DELETE FROM cdc_hooks_demo.person WHERE name = 'Bob';

-- name: demo_listeners
-- Listeners a previous demo left behind (killed before it cleaned up).
SELECT id FROM cdc_hooks.listeners WHERE hook = ANY(%(hooks)s);
