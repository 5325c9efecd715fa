#!/bin/sh
# The `install` service: triggers for the hooks of cdc_hooks.toml, then durian's three
# listeners (and one for myhook) pointing at the debug receiver, unless a previous run
# added them already.
set -eu

cdc-hooks install

receiver=http://receiver:8000
if cdc-hooks listeners list | grep -q "$receiver/"; then
    echo "listeners for $receiver exist already"
else
    cdc-hooks listeners add person "$receiver/joe" --match name=Joe --secret "$DEMO_SECRET"
    cdc-hooks listeners add person "$receiver/starts-with-j" --match name=startswith:J \
        --secret "$DEMO_SECRET"
    cdc-hooks listeners add person "$receiver/everything" --secret "$DEMO_SECRET"
    cdc-hooks listeners add myhook "$receiver/myhook" --secret "$DEMO_SECRET"
fi
cdc-hooks listeners list
