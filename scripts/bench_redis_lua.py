#!/usr/bin/env python3
"""What the ledger's Lua costs Redis per call, by function, on a realistic account.

Loads the library from src/redis/lua (assembled as `src/redis/function.rs` does: GCRA lib, ledger
prelude, one registered function per file, the ledger's starting with `begin`), tops up 8
accounts, then runs ROUNDS rounds of: 8 reserves (one per account, a new hold id each, the
gateway's arguments: two rate-limit buckets, a request id and a key id), then the 8 closes
(settle, 'always'). Each phase is pipelined on one connection; `INFO commandstats` (the `fcall`
usec) is read around each phase, so reserve and close are timed apart. Prints µs per call
(commandstats, inner commands included) and the inner commands' share.

    scripts/bench_redis_lua.py [ROUNDS=1000] [STAGE]

Starts its own redis-server on a free port (no persistence) and stops it at the end. Run it alone
on the machine (`flock -x -w 900 /work/cpu.lock`): it measures time. BENCH_REDIS_PREFIX is put
before the redis-server command, e.g. "valgrind --tool=callgrind --callgrind-out-file=FILE" for
instruction counts (written when the server stops).

STAGE bisects: `reserve:N` or `close:N` times a copy of that function cut short (a `return`
inserted after the N-th of its CUTS below: 0 is the call alone, without `begin`), while the
real function, run untimed after it on the same holds, keeps the account as the gateway's.
The difference between two stages is the cost of the code between their cuts.

STAGE `many` is a prototype of coalescing: the 8 reserves of a round go as one FCALL of a
`reserve_many` (8 keys, the 8 reserves' arguments one after the other, the reserve's code run
for each in turn) instead of 8 pipelined FCALLs. Compare its `INFO cpu` per billed request with
a run without a stage (both lines are printed).
"""
import atexit
import os
import socket
import subprocess
import sys
import time

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
STAGE = sys.argv[2] if len(sys.argv) > 2 else ""
LUA = os.path.join(os.path.dirname(__file__), "..", "src", "redis", "lua")
# Where a stage stops: after the line starting with the N-th prefix (1: right after `begin`),
# or before it when the prefix is given as ("before", prefix).
CUTS = {
    "reserve": ["", "local S, v = load(", "local limits", "journal(S, NOW, 'reserve'"],
    "close": ["", "local S, v = load(", "if v[", ("before", "if charged == nil then")],
}
CUT = "do return {'held', 0, 1} end"
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
    if STAGE == "many":
        body += (f"local function reserve_one(KEYS, ARGV)\nbegin(KEYS, ARGV)\n{read('reserve')}\nend\n"
                 f"redis.register_function('{NAME}_many', function(KEYS, ARGV)\n"
                 "  local out, per = {}, #ARGV / #KEYS\n"
                 "  for i = 1, #KEYS do\n"
                 "    local a = {}\n"
                 "    for j = 1, per do a[j] = ARGV[(i - 1) * per + j] end\n"
                 "    out[i] = reserve_one({ KEYS[i] }, a)\n"
                 "  end\n"
                 "  return out\n"
                 "end)\n")
    elif STAGE:
        fn, n = STAGE.split(":")
        n = int(n)
        code = read(fn)
        if n == 0:
            body += f"redis.register_function('{NAME}_cut', function(KEYS, ARGV) {CUT} end)\n"
        else:
            cut = CUTS[fn][n - 1]
            before, cut = cut if isinstance(cut, tuple) else (None, cut)
            out, done = ([CUT], True) if cut == "" else ([], False)
            for line in code.splitlines():
                if not done and before and line.startswith(cut):
                    out.append(CUT)
                    done = True
                out.append(line)
                if not done and not before and line.startswith(cut):
                    out.append(CUT)
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


def start_redis():
    """A redis-server of our own on a free port; stopped at exit."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    prefix = os.environ.get("BENCH_REDIS_PREFIX", "").split()
    server = subprocess.Popen(prefix + ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                               "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    atexit.register(lambda: (server.terminate(), server.wait()))
    for _ in range(300):
        try:
            return Conn(port)
        except OSError:
            time.sleep(0.05)
    sys.exit("redis-server did not start")


c = start_redis()
c.call("FUNCTION", "LOAD", "REPLACE", library())
ACCTS = [f"tollgate:{{acct:acct_{i}}}" for i in range(8)]
for i, a in enumerate(ACCTS):
    c.call("FCALL", f"{NAME}_top_up", 1, a, 10**12, f"config:initial:acct_{i}", 2**53 - 1, 200, 0)
BUCKETS = ["rl:plan:big|0", 600, 10000000, 1, "rl:plan:big|1", 30, 2000000000, 9]
hold = 10**15
totals = {"reserve": [0, 0], "close": [0, 0]}


def phase(name, cmds, ok):
    """Times `cmds` (or their cut copies, then runs the real ones untimed)."""
    timed = cmds
    if STAGE.startswith(name + ":"):
        timed = [encode_cut(cmd, name) for cmd in cmds]
    if STAGE == "many" and name == "reserve":
        keys = [a for a in ACCTS]
        args = [x for cmd in MANY for x in cmd]
        before = fcall_usec(c)
        (replies,) = c.pipeline([encode("FCALL", f"{NAME}_many", len(keys), *keys, *args)])
        after = fcall_usec(c)
        totals[name][0] += len(keys)
        totals[name][1] += after[1] - before[1]
        for rep in replies:
            assert ok(rep), rep
        return
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


def cpu_us():
    info = c.call("INFO", "cpu").decode()
    return sum(float(l.split(":")[1]) for l in info.splitlines() if l.startswith(("used_cpu_sys:", "used_cpu_user:"))) * 1e6


c.call("CONFIG", "RESETSTAT")
cpu0 = cpu_us()
for r in range(ROUNDS):
    ids = []
    cmds = []
    MANY = []
    for i, a in enumerate(ACCTS):
        hold += 7919
        ids.append(hold)
        args = [hold, 2, 600000, 86400000, "", "", f"req_6faa84021255f149{r:016d}", f"key_{i}", *BUCKETS, 200, 0]
        MANY.append(args)
        cmds.append(encode("FCALL", f"{NAME}_reserve", 1, a, *args))
    phase("reserve", cmds, lambda rep: rep[0] == b"held")
    cmds = [encode("FCALL", f"{NAME}_close", 1, a, h, "settle", 2, 0, "always", 200, 0)
            for a, h in zip(ACCTS, ids)]
    phase("close", cmds, lambda rep: rep[2] == b"1")
cpu = cpu_us() - cpu0
print(f"INFO cpu: {cpu / ROUNDS / 8:.2f} µs per reserve + close (the driver's INFO calls included)")
for name, (n, us) in totals.items():
    print(f"{name:8} {n:7d} calls  {us / n:6.2f} µs per call (commandstats){'  (cut: ' + STAGE + ')' if STAGE.startswith(name) else ''}")
if not STAGE:
    # With a stage, the untimed real calls run commands too: only without one.
    inner = inner_usec(c)
    calls = sum(v[0] for v in totals.values())
    print(f"inner commands: {inner / calls:.2f} µs per call; Lua and the call itself: "
          f"{(sum(v[1] for v in totals.values()) - inner) / calls:.2f} µs per call")
