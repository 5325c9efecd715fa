-- Run once by the postgres image when its data volume is created: the application's table.
-- durian's Person: name and address are passed on to listeners, secret must never be.
CREATE TABLE person (
    id      serial PRIMARY KEY,
    name    text NOT NULL,
    address text NOT NULL DEFAULT '',
    secret  text NOT NULL DEFAULT ''
);
