#!/usr/bin/env python3
"""NBD benchmarks: pmcache against nbdkit in the same run, with fio's nbd engine.

Setups (all over Unix sockets on this machine, all data in /dev/shm):
  memory   nbdkit memory plugin: the NBD transport limit (no origin, no cache)
  origin   nbdkit memory + delay filter (1 ms per read/write/zero/trim): the slow NAS stand-in
  nbdcache nbdkit cache filter (cache=writeback, cache-on-read=true, cache file in /dev/shm)
           in front of the delayed origin, through nbdkit's nbd plugin
  pmcache  pmcache serve (writeback, 1 GiB cache in /dev/shm, --assume-pmem) in front of the
           delayed origin

The working set (256 MiB) is written with random data on memory and origin first, then read once
sequentially through nbdcache and pmcache (the warm-up: both caches promote on read), so every
measured read is a cache hit. Each case runs for RUNTIME seconds per setup; with --reps N the
setups are interleaved N times and the median IOPS (and the latency of that run) is reported.

Usage: bench/nbd_bench.py [--runtime SECONDS] [--reps N] [--cases A,B] [--pin CPU] [--out FILE.json]
                         [--perf CASES]
  --cases      run only these cases (comma-separated labels, default: all)
  --pin CPU    pin every server (all threads) and fio to this one CPU. On a small VM, QD1
               latency is otherwise dominated by waking the other (idle) vCPU for every
               request/reply hand-off (~35 us round trip here), whatever the server.
  --perf CASES also record `perf record --call-graph dwarf` of the pmcache server during the first run of each
               listed case (comma-separated, e.g. randread_4k_qd32,randwrite_4k_qd32) into
               perf-CASE.data in the current directory (use --reps 1: it slows that run).
Needs: nbdkit (memory plugin, delay and cache filters, nbd plugin), fio with the nbd engine,
and a release build of pmcache (cargo build --release -p pmcache).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# PMCACHE_BIN picks another build, for A/B runs.
PMCACHE = os.environ.get("PMCACHE_BIN") or os.path.join(ROOT, "target", "release", "pmcache")
SIZE = "1G"
WORKSET = "256M"
DELAY = "1ms"
SETUPS = ("memory", "nbdcache", "pmcache")
PLAN = [
    # label, fio rw, block size, queue depth
    ("randread_4k_qd32", "randread", "4k", 32),
    ("randwrite_4k_qd32", "randwrite", "4k", 32),
    ("randread_4k_qd1", "randread", "4k", 1),
    ("randwrite_4k_qd1", "randwrite", "4k", 1),
    ("read_1m_qd8", "read", "1M", 8),
    ("write_1m_qd8", "write", "1M", 8),
]


def uri_of(sock):
    return f"nbd+unix:///?socket={sock}"


def wait_socket(path, proc, timeout=60, fail=RuntimeError, detail=lambda: ""):
    """Wait until the server accepts connections on its Unix socket; raise `fail` if it exits
    first (with `detail()`, e.g. its log's tail) or does not accept within `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise fail(f"server exited early ({proc.returncode}): {' '.join(proc.args)}\n{detail()}")
        if os.path.exists(path):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                return
            except OSError:
                pass
            finally:
                s.close()
        time.sleep(0.05)
    raise fail(f"socket {path} did not accept connections within {timeout} s: {' '.join(proc.args)}")


class Servers:
    """Child servers, each stopped by its own PID (SIGTERM, bounded wait, then SIGKILL)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []

    def start(self, name, args, env=None):
        sock = os.path.join(self.tmp, name + ".sock")
        full = [a.replace("{sock}", sock) for a in args]
        log = open(os.path.join(self.tmp, name + ".log"), "w")
        p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.procs.append((name, p))
        wait_socket(sock, p)
        return sock, p

    def stop_all(self):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    print(f"{name} (pid {p.pid}) ignored SIGTERM for 120 s: killing it", file=sys.stderr)
                    p.kill()
                    p.wait()
        self.procs = []


PIN = []


def fio(sock, rw, bs, iodepth, runtime=None, size=WORKSET, extra=()):
    """One fio job with the nbd engine; returns IOPS, bandwidth and completion latencies."""
    cmd = [*PIN, "fio", "--name=job", "--ioengine=nbd", f"--uri={uri_of(sock)}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={iodepth}", f"--size={size}", "--output-format=json",
           "--randrepeat=0", "--norandommap", *extra]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", "--ramp_time=1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=(runtime or 0) + 300)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    out = r.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}: {' '.join(cmd)}")
    side = job["write"] if "write" in rw else job["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "gib_s": side["bw_bytes"] / (1 << 30),
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


def fill(sock):
    """Write the working set with random data (1 MiB requests)."""
    fio(sock, "write", "1M", 8, extra=("--refill_buffers",))


def warm(sock):
    """One sequential read pass over the working set: misses are promoted."""
    fio(sock, "read", "1M", 8)


def pm_stats(cache):
    r = subprocess.run([PMCACHE, "stats", "--cache", cache, "--json"], capture_output=True, text=True,
                       timeout=30)
    if r.returncode != 0:
        return None
    try:
        return json.loads(r.stdout)
    except json.JSONDecodeError:
        return None


def median_run(runs):
    """The run with the median IOPS (so its latencies belong to one run)."""
    order = sorted(runs, key=lambda r: r["iops"])
    return order[len(order) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=6)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out")
    ap.add_argument("--perf", metavar="CASES", default="")
    ap.add_argument("--cases", default="")
    ap.add_argument("--pin", type=int, metavar="CPU")
    a = ap.parse_args()
    plan = [c for c in PLAN if not a.cases or c[0] in a.cases.split(",")]
    if not plan:
        sys.exit(f"no such case in {a.cases}: choose from {', '.join(c[0] for c in PLAN)}")
    for tool in ("nbdkit", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install -y nbdkit fio)")
    if not os.path.exists(PMCACHE):
        sys.exit("build pmcache first: cargo build --release -p pmcache")
    if a.perf and not shutil.which("perf"):
        sys.exit("--perf needs perf (apt-get install -y linux-perf)")
    tmp = tempfile.mkdtemp(prefix="pmcache-bench-", dir="/dev/shm")
    s = Servers(tmp)
    results = {"runtime_s": a.runtime, "reps": a.reps, "workset": WORKSET, "delay": DELAY, "cases": {}}
    cache = os.path.join(tmp, "cache.pmem")
    try:
        mem, _ = s.start("memory", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}",
                                    "memory", SIZE])
        origin, _ = s.start("origin", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}",
                                       "--filter=delay", "memory", SIZE, f"delay-read={DELAY}",
                                       f"delay-write={DELAY}", f"delay-zero={DELAY}",
                                       f"delay-trim={DELAY}"])
        nbdcache, _ = s.start("nbdcache", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}",
                                           "--filter=cache", "nbd", f"socket={origin}", "cache=writeback",
                                           "cache-on-read=true"],
                              env=dict(os.environ, TMPDIR=tmp))
        # No sequential cutoff: the warm-up is a sequential pass, which would
        # otherwise go around the cache and leave the measured reads missing.
        pm, pm_proc = s.start("pmcache", [PMCACHE, "serve", "--cache", cache, "--cache-size", SIZE,
                                          "--origin", uri_of(origin), "--socket", "{sock}",
                                          "--assume-pmem", "--sequential-cutoff", "0"])
        socks = {"memory": mem, "nbdcache": nbdcache, "pmcache": pm}
        if a.pin is not None:
            for _, p in s.procs:
                subprocess.run(["taskset", "-a", "-p", "-c", str(a.pin), str(p.pid)],
                               stdout=subprocess.DEVNULL, check=True)
            PIN[:] = ["taskset", "-c", str(a.pin)]
            results["pinned_cpu"] = a.pin
        t0 = time.time()
        fill(mem)
        fill(origin)
        print(f"filled the working set on memory and origin in {time.time() - t0:.1f} s", flush=True)
        for name in ("nbdcache", "pmcache"):
            t0 = time.time()
            warm(socks[name])
            print(f"warm-up pass through {name}: {time.time() - t0:.1f} s", flush=True)
        st = pm_stats(cache)
        if st is not None:
            results["pmcache_stats_after_warmup"] = st

        for label, rw, bs, qd in plan:
            runs = {name: [] for name in SETUPS}
            for rep in range(a.reps):
                for name in SETUPS:
                    perf = None
                    if label in a.perf.split(",") and name == "pmcache" and rep == 0:
                        perf = subprocess.Popen(["perf", "record", "--call-graph", "dwarf,8192", "-F", "1000",
                                                 "-o", f"perf-{label}.data",
                                                 "-p", str(pm_proc.pid)],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                        time.sleep(0.5)
                    r = fio(socks[name], rw, bs, qd, a.runtime)
                    if perf is not None:
                        perf.send_signal(signal.SIGINT)
                        perf.wait(timeout=120)
                    runs[name].append(r)
            case = {name: median_run(runs[name]) for name in SETUPS}
            case["all_iops"] = {name: [r["iops"] for r in runs[name]] for name in SETUPS}
            pmr, memr, ncr = case["pmcache"], case["memory"], case["nbdcache"]
            case["pmcache_vs_memory"] = pmr["iops"] / memr["iops"]
            case["pmcache_vs_nbdcache"] = pmr["iops"] / ncr["iops"]
            results["cases"][label] = case
            for name in SETUPS:
                r = case[name]
                print(f"{label:18} {name:9} iops {r['iops']:>9.0f} {r['gib_s']:6.2f} GiB/s  "
                      f"p50 {r['p50_us']:8.1f} us  p99 {r['p99_us']:8.1f} us  "
                      f"(runs: {', '.join(f'{x:.0f}' for x in case['all_iops'][name])})", flush=True)
            print(f"{label:18} pmcache/memory {case['pmcache_vs_memory']:.2f}x  "
                  f"pmcache/nbdkit-cache {case['pmcache_vs_nbdcache']:.2f}x", flush=True)
        st = pm_stats(cache)
        if st is not None:
            results["pmcache_stats_at_end"] = st
    finally:
        s.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
