"""debug-receiver: real HTTP on loopback, signatures made by the standardwebhooks package."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime

import httpx
import pytest
import standardwebhooks

from cdc_hooks.receiver import INVALID, MISSING, SKIPPED, VERIFIED, Delivery, Receiver, format_delivery
from cdc_hooks.signing import generate_secret

SECRET = generate_secret()
BODY = ('{"id":"evt_1000","hook":"person","event":"insert","created":true,"key":{"id":1},'
        '"data":{"name":"Joe","address":"12 Elm Street"},"occurred_at":"2024-01-01T00:00:00+00:00"}')


def signed_headers(secret: str, msg_id: str, body: str = BODY) -> dict[str, str]:
    now = datetime.now(UTC)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": standardwebhooks.Webhook(secret).sign(msg_id, now, body),
        "content-type": "application/json",
    }


def post_all(secrets: list[str], requests: list[tuple[str, dict[str, str], str]]
             ) -> tuple[list[int], list[Delivery]]:
    """Runs a Receiver, POSTs (path, headers, body) to it, returns statuses and deliveries."""

    async def run() -> tuple[list[int], list[Delivery]]:
        seen: list[Delivery] = []
        receiver = Receiver(secrets, seen.append)
        url = await receiver.start("127.0.0.1", 0)
        try:
            async with httpx.AsyncClient() as client:
                statuses = [(await client.post(url + path, content=body, headers=headers)).status_code
                            for path, headers, body in requests]
        finally:
            await receiver.stop()
        return statuses, seen

    return asyncio.run(run())


def test_verifies_a_correctly_signed_request_and_flags_a_bad_one():
    other = generate_secret()
    statuses, seen = post_all([SECRET], [
        ("/good", signed_headers(SECRET, "msg_1000_1"), BODY),
        ("/wrong-secret", signed_headers(other, "msg_1000_2"), BODY),
        ("/tampered", signed_headers(SECRET, "msg_1000_3"), BODY.replace("Joe", "Jim")),
        ("/unsigned", {"webhook-id": "msg_1000_4"}, BODY),
    ])
    assert statuses == [200, 200, 200, 200], "a debug receiver answers 200 whatever it got"
    by_path = {d.path: d for d in seen}
    assert by_path["/good"].signature == VERIFIED
    assert by_path["/wrong-secret"].signature == INVALID
    assert by_path["/tampered"].signature == INVALID
    assert by_path["/unsigned"].signature == MISSING
    good = by_path["/good"]
    assert good.webhook_id == "msg_1000_1"
    assert good.payload["data"] == {"name": "Joe", "address": "12 Elm Street"}


def test_any_of_several_secrets_verifies():
    first, second = generate_secret(), generate_secret()
    _, seen = post_all([first, second], [("/x", signed_headers(second, "msg_1_1"), BODY)])
    assert seen[0].signature == VERIFIED


def test_without_secret_the_check_is_skipped_and_the_output_says_so():
    _, seen = post_all([], [("/x", signed_headers(SECRET, "msg_1000_1"), BODY)])
    assert seen[0].signature == SKIPPED
    text = format_delivery(seen[0])
    assert "unsigned check skipped" in text
    assert "hook: person  event: insert" in text
    assert '"name": "Joe"' in text


def test_a_body_that_is_not_json_is_shown_raw():
    _, seen = post_all([], [("/x", {}, "plain text")])
    assert seen[0].payload is None
    assert "body (not a JSON object): plain text" in format_delivery(seen[0])


def test_command_prints_each_delivery_and_its_signature_check():
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_HOOKS_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cdc_hooks", "debug-receiver", "--port", "0", "--secret", SECRET],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        first = proc.stdout.readline()  # type: ignore[union-attr]
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        url = match.group(1)
        good = httpx.post(url + "/joe", content=BODY, headers=signed_headers(SECRET, "msg_1000_1"))
        bad = httpx.post(url + "/joe", content=BODY,
                         headers=signed_headers(generate_secret(), "msg_1000_2"))
        assert (good.status_code, bad.status_code) == (200, 200)
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output
    assert "POST /joe  webhook-id: msg_1000_1  signature: verified" in output
    assert "POST /joe  webhook-id: msg_1000_2  signature: INVALID" in output
    assert '"address": "12 Elm Street"' in output
    assert "stopped after 2 deliveries" in output


@pytest.mark.parametrize("secret", ["nope", "whsec_!!!", "whsec_c2hvcnQ="])
def test_command_refuses_a_malformed_secret(cli_runner_result, secret):
    result = cli_runner_result("debug-receiver", "--port", "0", "--secret", secret)
    assert result.exit_code == 2
    assert "error: secret must" in result.stderr


@pytest.fixture
def cli_runner_result():
    from click.testing import CliRunner

    from cdc_hooks.cli import main

    return lambda *args: CliRunner().invoke(main, list(args), catch_exceptions=False)
