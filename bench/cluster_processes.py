#!/usr/bin/env python3
"""N real `weft node` processes on loopback, all seeded with n1: how the
cluster forms, spreads a registration, sees a kill -9, and what it costs at
rest. Python standard library only.

    python3 bench/cluster_processes.py --nodes 200 [--weft target/release/weft]
        [--rest 20] [--trials 3] [--port 21000] [--threads N]

Ports: four ranges of 1000 from --port (gossip, tunnel, proxy, admin); keep
them below the kernel's ephemeral range (32768 up), where the nodes' own
outgoing sockets would take some of them.

Prints one markdown table row:

- formed: from the first start until every node's `GET /v1/members` lists
  all N alive;
- registration: `weft register` on a random node, until each node's
  `GET /v1/services` lists it (p50, p99 and last, pooled over the trials);
- intentions: `weft intentions deny` (signed by an operator certificate)
  on a random node, until each node's `GET /v1/intentions` holds that
  version (p50 and last, pooled over the trials);
- kill -9: a random node other than n1, until each survivor's members list
  has it not alive (first and last survivor);
- at rest: the CPU of all N processes together (from /proc) over --rest
  seconds with nobody polling, and the gossip bytes each node sent
  (`weft_gossip_bytes_total` from its metrics).

Polling is one keep-alive HTTP connection per node, round robin, so the
poller costs about one request per node per round.
"""

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time


def log(*a):
    print(*a, file=sys.stderr, flush=True)


class Admin:
    """One keep-alive HTTP/1.1 connection to a node's admin port."""

    def __init__(self, port):
        self.port = port
        self.conn = None

    def get(self, path):
        for _ in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                self.conn.request("GET", path)
                resp = self.conn.getresponse()
                body = resp.read()
                if resp.status != 200:
                    return None
                return body
            except (OSError, http.client.HTTPException):
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
        return None

    def json(self, path):
        body = self.get(path)
        try:
            return json.loads(body) if body else None
        except ValueError:
            return None

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def cpu_seconds(pids):
    hz = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(") ", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total / hz


def gossip_sent(admin):
    body = admin.get("/metrics")
    if not body:
        return 0
    for line in body.decode(errors="replace").splitlines():
        if line.startswith("weft_gossip_bytes_total") and 'direction="sent"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0


def until_each(admins, which, done, limit):
    """Round-robin polls the nodes in `which` until `done(admin)` holds for
    each; returns {index: seconds} for those that got there within
    `limit`."""
    t0 = time.monotonic()
    pending = set(which)
    seen = {}
    while pending and time.monotonic() - t0 < limit:
        for i in list(pending):
            if done(admins[i]):
                seen[i] = time.monotonic() - t0
                pending.discard(i)
        time.sleep(0.01)
    return seen


def quantile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[round((len(values) - 1) * q)]


def ms(v):
    return "-" if v is None else f"{v * 1000:.0f}"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=200)
    p.add_argument("--weft", default="target/release/weft")
    p.add_argument("--rest", type=float, default=20)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--port", type=int, default=21000)
    p.add_argument("--formation-limit", type=float, default=300)
    p.add_argument("--threads", type=int, help="--worker-threads of every node (default: the node's)")
    a = p.parse_args()
    n, weft = a.nodes, os.path.abspath(a.weft)
    if n > 999:
        sys.exit("at most 999 nodes (four port ranges of 1000 from --port)")
    tmp = tempfile.mkdtemp(prefix="weft-procs-")
    procs = []

    def port(kind, i):  # kind 0 gossip, 1 tunnel, 2 proxy, 3 admin
        return a.port + kind * 1000 + i

    def stop_all(*_):
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
        for pr in procs:
            pr.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    signal.signal(signal.SIGTERM, lambda *_: (stop_all(), sys.exit(1)))
    try:
        subprocess.run([weft, "init", "--dir", f"{tmp}/cl"], check=True, stdout=subprocess.DEVNULL)
        env = dict(os.environ, RUST_LOG="warn")
        t0 = time.monotonic()
        for i in range(1, n + 1):
            d = f"{tmp}/n{i}"
            os.mkdir(d)
            cmd = [weft, "node", "--name", f"n{i}", "--cluster", f"{tmp}/cl",
                   "--gossip", f"127.0.0.1:{port(0, i)}", "--tunnel", f"127.0.0.1:{port(1, i)}",
                   "--proxy", f"127.0.0.1:{port(2, i)}", "--admin", f"127.0.0.1:{port(3, i)}",
                   "--data-dir", d, "--socket", f"{d}/s", "--seeds", f"127.0.0.1:{port(0, 1)}"]
            if a.threads:
                cmd += ["--worker-threads", str(a.threads)]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=open(f"{d}/log", "w")))
        admins = [Admin(port(3, i)) for i in range(1, n + 1)]
        everyone = range(n)

        def alive_count(admin):
            m = admin.json("/v1/members")
            return 0 if not m else sum(1 for x in m["members"] if x["state"] == "alive")

        formed = until_each(admins, everyone, lambda ad: alive_count(ad) >= n, a.formation_limit)
        formed_s = (time.monotonic() - t0) if len(formed) == n else None
        log(f"formed: {len(formed)}/{n} nodes saw all alive")

        for ad in admins:
            ad.close()
        pids = [pr.pid for pr in procs]
        sent0 = sum(gossip_sent(ad) for ad in admins)
        for ad in admins:
            ad.close()
        c0, w0 = cpu_seconds(pids), time.monotonic()
        time.sleep(a.rest)
        vcpu = (cpu_seconds(pids) - c0) / (time.monotonic() - w0)
        sent1 = sum(gossip_sent(ad) for ad in admins)
        sent_rate = (sent1 - sent0) / (time.monotonic() - w0) / n
        false_deaths = sum(1 for ad in admins if alive_count(ad) < n)

        reg, missed = [], 0
        for trial in range(a.trials):
            owner = random.randrange(n)
            name = f"probe{trial}"
            subprocess.run([weft, "--socket", f"{tmp}/n{owner + 1}/s", "register", name,
                            "--port", str(40000 + trial)], check=True, stdout=subprocess.DEVNULL)
            t = time.monotonic()

            def has(ad, name=name):
                s = ad.json("/v1/services")
                return bool(s) and name in s["services"]

            seen = until_each(admins, everyone, has, 30)
            reg += list(seen.values())
            missed += n - len(seen)
            log(f"registration {trial}: {len(seen)}/{n} within {time.monotonic() - t:.1f} s")

        subprocess.run([weft, "cert", "issue", "ops", "--operator", "--cluster", f"{tmp}/cl",
                        "--out", f"{tmp}/ops"], check=True, stdout=subprocess.DEVNULL)
        signed = dict(os.environ, WEFT_OPERATOR_CERT=f"{tmp}/ops/ops.pem",
                      WEFT_OPERATOR_KEY=f"{tmp}/ops/ops.key")
        policy, policy_missed = [], 0
        for trial in range(a.trials):
            writer = random.randrange(n)
            t = time.monotonic()
            subprocess.run([weft, "--socket", f"{tmp}/n{writer + 1}/s", "intentions", "deny",
                            f"caller{trial}", "probe0"], check=True, stdout=subprocess.DEVNULL, env=signed)
            version = trial + 1

            def holds(ad, version=version):
                held = ad.json("/v1/intentions")
                return bool(held) and held["intentions"]["version"] >= version

            seen = until_each(admins, everyone, holds, 30)
            policy += list(seen.values())
            policy_missed += n - len(seen)
            log(f"intentions {trial}: {len(seen)}/{n} within {time.monotonic() - t:.1f} s")

        victim = random.randrange(1, n)
        procs[victim].kill()
        vname = f"n{victim + 1}"

        def sees_dead(ad):
            m = ad.json("/v1/members")
            return bool(m) and any(x["name"] == vname and x["state"] != "alive" for x in m["members"])

        survivors = [i for i in everyone if i != victim]
        dead = until_each(admins, survivors, sees_dead, 60)
        log(f"kill: {len(dead)}/{len(survivors)} survivors saw {vname} not alive")
        row = [
            str(n),
            "not within %d s" % a.formation_limit if formed_s is None else f"{formed_s:.1f} s",
            ms(quantile(reg, 0.5)), ms(quantile(reg, 0.99)),
            ms(max(reg) if reg else None) + (f" ({missed} never)" if missed else ""),
            ms(quantile(policy, 0.5)),
            ms(max(policy) if policy else None) + (f" ({policy_missed} never)" if policy_missed else ""),
            ms(min(dead.values()) if dead else None),
            ms(max(dead.values())) if len(dead) == len(survivors) else "not within 60 s",
            f"{sent_rate / 1000:.1f} KB/s",
            f"{vcpu:.2f} vCPU ({vcpu * 1000 / n:.1f} mCPU per node)",
            str(false_deaths),
        ]
        print("| nodes | formed | reg p50 ms | reg p99 ms | reg all ms | intentions p50 ms "
              "| intentions all ms | kill: first dead ms "
              "| kill: all dead ms | sent per node at rest | CPU at rest, all processes "
              "| nodes missing a live member after the rest |")
        print("|" + "---|" * len(row))
        print("| " + " | ".join(row) + " |")
    finally:
        stop_all()


if __name__ == "__main__":
    main()
