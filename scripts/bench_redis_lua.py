#!/usr/bin/env python3
"""What the ledger's Lua costs Redis per call, by function, on a realistic account.

Loads the library from src/redis/lua (assembled as `src/redis/function.rs` does: GCRA lib, ledger
prelude, one registered function per file, the ledger's starting with `begin`), tops up 8
accounts, then runs ROUNDS rounds of: 8 reserves (one per account, a new hold id each, the
gateway's arguments: two rate-limit buckets, a request id and a key id), then the 8 closes
(settle, 'always'). Each phase is pipelined on one connection; `INFO commandstats` (the `fcall`
usec) is read around each phase, so reserve and close are timed apart. Prints µs per call
(commandstats, inner commands included) and the inner commands' share.

    scripts/bench_redis_lua.py PORT [ROUNDS=5000] [STAGE]

STAGE bisects: `reserve:N` or `close:N` times a copy of that function cut short (a `return`
inserted after the N-th of its CUTS below: 0 is the call alone, without `begin`), while the
real function, run untimed after it on the same holds, keeps the account as the gateway's.
The difference between two stages is the cost of the code between their cuts.
"""
import os
import socket
import sys

PORT = int(sys.argv[1])
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
STAGE = sys.argv[3] if len(sys.argv) > 3 else ""
LUA = os.path.join(os.path.dirname(__file__), "..", "src", "redis", "lua")
# Where a stage stops: after the line starting with the N-th prefix (1: after `begin`).
CUTS = {
    "reserve": ["", "local S, v = load(", "local limits", "journal(S, NOW, 'reserve'"],
    "close": ["", "local S, v = load(", "if v[", "if charged == nil then"],
}
LEDGER = ["reserve", "close", "top_up", "balance", "expire", "extend"]
OTHERS = ["gcra", "journal"]
NAME = "tollgate_bench"


def read(name):
    with open(os.path.join(LUA, name + ".lua")) as f:
        return f.read()


def library():
    body = read("gcra_lib") + "\n" + read("ledger_prelude") + "\n"
    for name in LEDGER:
        body += f"redis.register_function('{NAME}_{name}', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n{read(name)}\nend)\n"
    for name in OTHERS:
        body += f"redis.register_function('{NAME}_{name}', function(KEYS, ARGV)\n{read(name)}\nend)\n"
    if STAGE:
        fn, n = STAGE.split(":")
        n = int(n)
        code = read(fn)
        if n == 0:
            body += f"redis.register_function('{NAME}_cut', function(KEYS, ARGV) return {{'held', 0, 1}} end)\n"
        else:
            lines, out, cut = code.splitlines(), [], CUTS[fn][n - 1]
            done = cut == ""
            if done:
                out.append("do return {'held', 0, 1} end")
            for line in lines:
                if not done and cut == "if charged == nil then" and line.startswith(cut):
                    out.append("do return {'held', 0, 1} end")
                    done = True
                out.append(line)
                if not done and line.startswith(cut):
                    out.append("do return {'held', 0, 1} end")
                    done = True
            assert done, f"cut {cut!r} not found in {fn}.lua"
            body += f"redis.register_function('{NAME}_cut', function(KEYS, ARGV)\nbegin(KEYS, ARGV)\n" + "\n".join(out) + "\nend)\n"
    return f"#!lua name={NAME}\n" + body


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.f = self.s.makefile("rb")

    def reply(self):
        line = self.f.readline()
        t, rest = line[:1], line[1:-2]
        if t in (b"+", b":"):
            return rest
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        raise RuntimeError(f"bad reply {line!r}")

    def pipeline(self, cmds):
        self.s.sendall(b"".join(cmds))
        return [self.reply() for _ in cmds]

    def call(self, *args):
        return self.pipeline([encode(*args)])[0]


def fcall_usec(c):
    for line in c.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_fcall:"):
            kv = dict(p.split("=") for p in line.split(":", 1)[1].split(","))
            return int(kv["calls"]), int(kv["usec"])
    return 0, 0


def inner_usec(c):
    total = 0
    for line in c.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_") and not line.startswith(("cmdstat_fcall", "cmdstat_info", "cmdstat_config")):
            kv = dict(p.split("=") for p in line.split(":", 1)[1].split(","))
            total += int(kv["usec"])
    return total


c = Conn(PORT)
c.call("FUNCTION", "LOAD", "REPLACE", library())
ACCTS = [f"tollgate:{{acct:acct_{i}}}" for i in range(8)]
for i, a in enumerate(ACCTS):
    c.call("FCALL", f"{NAME}_top_up", 1, a, 10**12, f"config:initial:acct_{i}", 2**53 - 1, 200, 0)
BUCKETS = ["rl:plan:big|0", 600, 10000000, 1, "rl:plan:big|1", 30, 2000000000, 9]
hold = 10**15
totals = {"reserve": [0, 0], "close": [0, 0]}
inner = 0


def phase(name, cmds, ok):
    """Times `cmds` (or their cut copies, then runs the real ones untimed)."""
    timed = cmds
    if STAGE.startswith(name + ":"):
        timed = [encode_cut(cmd, name) for cmd in cmds]
    before = fcall_usec(c)
    replies = c.pipeline(timed)
    after = fcall_usec(c)
    totals[name][0] += after[0] - before[0]
    totals[name][1] += after[1] - before[1]
    if timed is not cmds:
        replies = c.pipeline(cmds)
    for rep in replies:
        assert ok(rep), rep


def encode_cut(cmd, name):
    real = f"{NAME}_{name}".encode()
    return cmd.replace(b"$%d\r\n%s\r\n" % (len(real), real), b"$%d\r\n%s_cut\r\n" % (len(NAME) + 4, NAME.encode()), 1)


c.call("CONFIG", "RESETSTAT")
for r in range(ROUNDS):
    ids = []
    cmds = []
    for i, a in enumerate(ACCTS):
        hold += 7919
        ids.append(hold)
        cmds.append(encode("FCALL", f"{NAME}_reserve", 1, a, hold, 2, 600000, 86400000, "", "",
                           f"req_6faa84021255f149{r:016d}", f"key_{i}", *BUCKETS, 200, 0))
    phase("reserve", cmds, lambda rep: rep[0] == b"held")
    cmds = [encode("FCALL", f"{NAME}_close", 1, a, h, "settle", 2, 0, "always", 200, 0)
            for a, h in zip(ACCTS, ids)]
    phase("close", cmds, lambda rep: rep[2] == b"1")
inner = inner_usec(c)
calls = sum(v[0] for v in totals.values())
for name, (n, us) in totals.items():
    print(f"{name:8} {n:7d} calls  {us / n:6.2f} µs per call (commandstats)")
print(f"inner commands: {inner / calls:.2f} µs per call; Lua and the call itself: "
      f"{(sum(v[1] for v in totals.values()) - inner) / calls:.2f} µs per call")
