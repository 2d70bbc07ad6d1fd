"""Drives the gateway example with the official OpenAI Python SDK.

Usage: python3 openai_cases.py BASE_URL
Prints one JSON object: for each case, what the SDK returned or raised. tests/openai_sdk.rs runs
this against a gateway it started and asserts every field.
"""
import json
import sys
import time

import openai

base = sys.argv[1]


def client(key, retries=0):
    return openai.OpenAI(api_key=key, base_url=base + "/v1", max_retries=retries, timeout=20)


def raised(fn):
    try:
        fn()
        return {"raised": None}
    except openai.APIStatusError as e:
        return {
            "raised": type(e).__name__,
            "status": e.status_code,
            "code": e.code,
            "type": e.type,
            "param": e.param,
            "message": e.message,
            "request_id": e.request_id,
        }


def chat(key, model="mock-small", retries=0, **kw):
    return client(key, retries).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hello there"}], **kw
    )


out = {}

r = chat("sk-test-good-000000000000000000")
out["ok"] = {"content": r.choices[0].message.content, "total_tokens": r.usage.total_tokens}

parts, usage = [], None
for chunk in chat("sk-test-good-000000000000000000", stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage.total_tokens
out["stream"] = {"content": "".join(parts), "total_tokens": usage}

out["bad_key"] = raised(lambda: chat("sk-test-wrong-00000000000000000"))
out["revoked"] = raised(lambda: chat("sk-test-revoked-000000000000000"))
out["unknown_model"] = raised(lambda: chat("sk-test-good-000000000000000000", model="gpt-9"))
out["plan_model"] = raised(lambda: chat("sk-test-free-000000000000000000", model="mock-large"))
out["broke"] = raised(lambda: chat("sk-test-broke-00000000000000000"))
out["bad_request"] = raised(lambda: chat("sk-test-good-000000000000000000", max_tokens="many"))
out["not_found"] = raised(
    lambda: client("sk-test-good-000000000000000000").get("/nope", cast_to=object)
)

# A plan of 60 requests per minute with a burst of 1: the second request is refused for ~1 s.
chat("sk-test-slow-000000000000000000")
out["rate_limited"] = raised(lambda: chat("sk-test-slow-000000000000000000"))
started = time.monotonic()
chat("sk-test-slow-000000000000000000", retries=2)
out["retried_after"] = time.monotonic() - started

print(json.dumps(out))
