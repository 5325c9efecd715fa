-- The application's writes, run by the `writes` service once the hooks are installed.
-- Watch them arrive: docker compose logs -f receiver
INSERT INTO person (name, address, secret) VALUES
    ('Joe', '12 Elm Street', 'joe-secret'),
    ('Jane', '7 Oak Avenue', 'jane-secret'),
    ('Bob', '3 Pine Road', 'bob-secret');
UPDATE person SET address = '1 River Lane' WHERE name = 'Joe';
-- secret is not provided: this update sends nothing.
UPDATE person SET secret = 'jane-new-secret' WHERE name = 'Jane';
DELETE FROM person WHERE name = 'Bob';
SELECT cdc_hooks.send('myhook', '{"name": "George Costanza", "address": "New York City"}');
