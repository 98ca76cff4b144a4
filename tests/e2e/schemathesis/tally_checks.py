"""Tally's own rules for every answer, added to schemathesis's checks
(loaded through SCHEMATHESIS_HOOKS by tests/e2e/tests/openapi.rs)."""

import json
import os

import schemathesis


@schemathesis.check
def refusal_has_a_reason(ctx, response, case):
    """Every 4xx says why: JSON `{"error": "<reason>"}` with a reason; from
    the agent, which serves text only (TALLY_REASON_AS_TEXT), a line."""
    if not 400 <= response.status_code < 500:
        return None
    if os.environ.get("TALLY_REASON_AS_TEXT"):
        if not response.content.strip():
            raise AssertionError(f"{response.status_code} with an empty body")
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(
            f"{response.status_code} without a JSON body: {response.content[:200]!r}"
        )
    reason = body.get("error") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise AssertionError(
            f"{response.status_code} without an `error` reason: {response.content[:200]!r}"
        )
    return None
