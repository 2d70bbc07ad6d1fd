#!/usr/bin/env python3
"""Sustained load on a running tollgate gateway (loopback only), for scripts/soak.sh.

Standard library only. N keep-alive HTTP/1.1 connections send a mix of requests for DURATION
seconds: chat completions (JSON and SSE streamed, read to the end), model lists, unknown keys
from many client IPs (X-Forwarded-For through the trusted 127.0.0.1 proxy: grows the brute-force
shield's state), and bursts on a small plan (429s: grows the rate limiter's state). It samples
the gateway's RSS every few seconds and, at the end, checks through the admin API that no hold is
left open and that the balance is exactly the initial balance minus the cost of every usage the
gateway returned (cost = 1 + total_tokens with the soak config's prices).
"""
import argparse, asyncio, json, os, random, sys, time

CHAT = {"model": "mock-small", "max_tokens": 8, "messages": [{"role": "user", "content": "Hello soak"}]}


async def request(reader, writer, method, path, headers, body=b""):
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    for k, v in headers.items():
        head += f"{k}: {v}\r\n"
    if body:
        head += f"content-length: {len(body)}\r\n"
    writer.write(head.encode() + b"\r\n" + body)
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed")
    status = int(status_line.split()[1])
    length, chunked, close = None, False, False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        k, _, v = line.decode("latin-1").partition(":")
        k, v = k.strip().lower(), v.strip()
        if k == "content-length":
            length = int(v)
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
        elif k == "connection" and v.lower() == "close":
            close = True
    data = b""
    if chunked:
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                await reader.readline()
                break
            data += await reader.readexactly(size)
            await reader.readline()
    elif length is not None:
        data = await reader.readexactly(length)
    return status, data, close


def usage_cost(data):
    """The cost of the usage a response reported (JSON body or the SSE usage chunk), or None."""
    usage = None
    text = data.decode("utf-8", "replace")
    if text.startswith("data:") or "\ndata:" in text:
        for line in text.splitlines():
            if line.startswith("data: {"):
                u = json.loads(line[6:]).get("usage")
                if u:
                    usage = u
    else:
        try:
            usage = json.loads(text).get("usage")
        except ValueError:
            usage = None
    return None if usage is None else 1 + usage["total_tokens"]


class Stats:
    def __init__(self):
        self.count, self.statuses, self.expected_charge, self.errors = 0, {}, 0, 0


async def worker(args, stats, deadline, wid):
    rng = random.Random(wid)
    reader = writer = None
    while time.monotonic() < deadline:
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection(args.host, args.port)
            r = rng.random()
            if r < 0.55:
                body = dict(CHAT, stream=rng.random() < 0.4, stream_options={"include_usage": True})
                status, data, close = await request(reader, writer, "POST", "/v1/chat/completions",
                    {"authorization": f"Bearer {args.key}", "content-type": "application/json"},
                    json.dumps(body).encode())
                if status == 200:
                    cost = usage_cost(data)
                    if cost is None:
                        raise RuntimeError(f"200 without usage: {data[:200]!r}")
                    stats.expected_charge += cost
            elif r < 0.70:
                status, data, close = await request(reader, writer, "GET", "/v1/models",
                    {"authorization": f"Bearer {args.key}"})
            elif r < 0.85:
                ip = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
                status, data, close = await request(reader, writer, "GET", "/v1/models",
                    {"authorization": f"Bearer sk-unknown-{rng.randrange(10**9)}", "x-forwarded-for": ip})
            else:
                status, data, close = await request(reader, writer, "GET", "/v1/models",
                    {"authorization": f"Bearer {args.small_key}"})
            stats.count += 1
            stats.statuses[status] = stats.statuses.get(status, 0) + 1
            if close:
                writer.close()
                writer = None
        except (ConnectionError, asyncio.IncompleteReadError, OSError) as e:
            stats.errors += 1
            if writer is not None:
                writer.close()
            writer = None
            await asyncio.sleep(0.05)
    if writer is not None:
        writer.close()


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def admin(args, path):
    reader, writer = await asyncio.open_connection(args.host, args.port)
    status, data, _ = await request(reader, writer, "GET", path,
        {"authorization": f"Bearer {args.admin}", "connection": "close"})
    writer.close()
    assert status == 200, (status, data)
    return json.loads(data)


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--duration", type=float, default=120)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--key", required=True)
    p.add_argument("--small-key", required=True)
    p.add_argument("--admin", required=True)
    p.add_argument("--account", default="acct_soak")
    p.add_argument("--initial", type=int, required=True)
    p.add_argument("--metrics-port", type=int, default=0,
                   help="the gateway's [server] metrics_listen port (default: --port + 1)")
    p.add_argument("--scrape", type=float, default=0,
                   help="GET /metrics every SECS seconds, as Prometheus would (0: never)")
    args = p.parse_args()
    assert args.host in ("127.0.0.1", "localhost", "::1"), "loopback only"

    stats = Stats()
    start = time.monotonic()
    deadline = start + args.duration
    tasks = [asyncio.create_task(worker(args, stats, deadline, i)) for i in range(args.connections)]
    samples = []
    if args.scrape:
        async def scrape():
            while time.monotonic() < deadline:
                port = args.metrics_port or args.port + 1
                reader, writer = await asyncio.open_connection(args.host, port)
                await request(reader, writer, "GET", "/metrics", {"connection": "close"})
                writer.close()
                await asyncio.sleep(args.scrape)
        tasks.append(asyncio.create_task(scrape()))
    while time.monotonic() < deadline:
        await asyncio.sleep(min(5, max(0.1, deadline - time.monotonic())))
        samples.append((round(time.monotonic() - start), rss_kib(args.pid), stats.count))
        print(f"t={samples[-1][0]:>4}s rss={samples[-1][1] / 1024:.1f} MiB requests={stats.count}", flush=True)
    await asyncio.gather(*tasks)
    elapsed = time.monotonic() - start
    await asyncio.sleep(1)  # let the last settlements land

    account = await admin(args, f"/admin/accounts/{args.account}")
    expected = args.initial - stats.expected_charge
    warm = [s[1] for s in samples if s[0] >= min(30, args.duration / 4)] or [samples[-1][1]]
    report = {
        "requests": stats.count,
        "rps": round(stats.count / elapsed),
        "statuses": dict(sorted(stats.statuses.items())),
        "connection_errors": stats.errors,
        "rss_mib_after_warmup_first_last_max": [round(warm[0] / 1024, 1), round(warm[-1] / 1024, 1), round(max(warm) / 1024, 1)],
        "holds_open_at_end": account["holds"],
        "held_at_end": account["held"],
        "balance": account["balance"],
        "expected_balance": expected,
    }
    print(json.dumps(report, indent=2))
    ok = True
    if account["holds"] != 0 or account["held"] != 0:
        print("FAIL: holds left open", file=sys.stderr); ok = False
    if account["balance"] != expected:
        print(f"FAIL: balance {account['balance']} != expected {expected}", file=sys.stderr); ok = False
    if stats.statuses.get(500, 0) or any(s >= 500 for s in stats.statuses):
        print("FAIL: 5xx answers", file=sys.stderr); ok = False
    # Flat memory: after warm-up RSS grows by less than 25% (and less than 32 MiB).
    growth = warm[-1] - warm[0]
    if growth > max(warm[0] * 0.25, 32 * 1024):
        print(f"FAIL: RSS grew {growth / 1024:.1f} MiB after warm-up", file=sys.stderr); ok = False
    print("soak: OK" if ok else "soak: FAILED")
    sys.exit(0 if ok else 1)


asyncio.run(main())
