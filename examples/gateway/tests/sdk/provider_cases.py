"""Drives a gateway started from one of examples/providers/*.toml.

Usage: python3 provider_cases.py BASE_URL < cases.json
Each case is run in order and reported in one JSON object, by name:
- {"name", "sdk": {"key", "model", ...extra create() arguments}}: a chat completion through the
  official OpenAI SDK (no retries); reports the exception class the SDK raised and the raw body.
- {"name", "raw": {"method", "path", "headers", "body"}, "until": STATUS?, "max": N?}: one HTTP
  request (or the same one repeated until STATUS answers, at most N times); reports the status,
  the headers, the body (JSON when it parses) and how many requests were sent.
tests/providers.rs builds the cases and asserts every field.
"""
import json
import sys
import urllib.error
import urllib.request

import openai

base = sys.argv[1]
cases = json.load(sys.stdin)


def sdk(case):
    args = dict(case)
    key = args.pop("key")
    model = args.pop("model")
    client = openai.OpenAI(api_key=key, base_url=base + "/v1", max_retries=0, timeout=20)
    try:
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hello there"}], **args
        )
        return {"raised": None, "content": r.choices[0].message.content}
    except openai.APIStatusError as e:
        try:
            body = e.response.json()
        except ValueError:
            body = e.response.text
        return {
            "raised": type(e).__name__,
            "status": e.status_code,
            "code": e.code,
            "type": e.type,
            "param": e.param,
            "message": e.message,
            "request_id": e.request_id,
            "headers": {k.lower(): v for k, v in e.response.headers.items()},
            "body": body,
        }


def raw_once(case):
    data = case.get("body")
    if isinstance(data, (dict, list)):
        data = json.dumps(data)
    request = urllib.request.Request(
        base + case["path"],
        data=data.encode() if data is not None else None,
        method=case.get("method", "GET"),
        headers=case.get("headers", {}),
    )
    try:
        response = urllib.request.urlopen(request, timeout=20)
        status, headers, text = response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        status, headers, text = e.code, e.headers, e.read().decode()
    try:
        body = json.loads(text)
    except ValueError:
        body = text
    return {
        "status": status,
        "headers": {k.lower(): v for k, v in headers.items()},
        "body": body,
    }


def raw(case, until=None, limit=1):
    sent = 0
    while True:
        out = raw_once(case)
        sent += 1
        if until is None or out["status"] == until or sent >= limit:
            out["sent"] = sent
            return out


out = {}
for case in cases:
    if "sdk" in case:
        out[case["name"]] = sdk(case["sdk"])
    else:
        out[case["name"]] = raw(case["raw"], case.get("until"), case.get("max", 1))
print(json.dumps(out))
