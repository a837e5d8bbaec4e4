#!/usr/bin/env python3
"""Origin-path benchmark matrix (issue 14, deliverable 5): pmcache against its slow origin.

Each workload row runs the same fio job (nbd engine) through these setups, in one run:
  origin    the origin alone
  pmcache   pmcache serve (64 MiB cache in /dev/shm, --assume-pmem) in front of the origin, with
            the binary's default writeback order (ordered since issue 15)
  pmcache-none  the same with --writeback-order none (only with --orders ordered,none): the
            cost of ordering is pmcache / pmcache-none in the same run (issue 15)
  nbdcache  nbdkit's cache filter in front of the origin (nbd plugin; cache=writeback, or
            cache=writethrough for the writethrough row; cache-on-read=true,
            cache-max-size=64M, default thresholds high 95% / low 80%, default block size
            64 KiB; its cache file lives in /dev/shm via TMPDIR)
Every cell (origin model x row x setup x rep) starts from scratch: a fresh origin (new memory
plugin, so empty), a freshly formatted pmcache cache or a fresh nbdkit cache, all on Unix
sockets in a temporary directory under /dev/shm that is removed afterwards. Servers are
stopped by PID (SIGTERM, then SIGKILL after a bounded wait).

Origin models (--origins, default both), nbdkit memory plugin, 1 GiB:
  delay  delay filter, 1 ms on every read, write, zero and trim: a slow-latency NAS.
  rate   rate filter rate=8G (bits/s: 1 GiB/s) with burstiness=0.1: a fast link.
         `rate` limits the TOTAL bandwidth across all connections of that nbdkit (global; the
         per-connection limit would be connection-rate), with separate buckets for reads and
         writes; zero and trim are free. The default burstiness (2 s) lets an idle origin
         burst 2 GiB, which makes 5 s runs read up to ~1.6 GiB/s; 0.1 s keeps it at 1 GiB/s.
         No latency is added by default: the delay filter of nbdkit 1.32 counts in whole
         milliseconds and parses "0.2ms" as 0 ms without complaint (sscanf "%u"), so the
         intended 0.2 ms cannot be expressed; --rate-delay MS adds a delay filter with MS
         (whole) milliseconds on every read, write, zero and trim.
nbdkit serves 16 requests at a time per connection (its default thread pool), so the delay
origin tops out near 16 K IOPS for small requests.

Rows (label: fio job; target for pmcache/origin):
  seqwrite_1m_qd8         1 MiB sequential write QD8 over 1 GiB (time based): a 64 MiB cache
                          must write back at the rate it absorbs. Write-absorbing: >= 0.95x.
  seqread_1m_qd8_cold     1 MiB sequential read QD8 over 1 GiB; the origin is filled first (fio
                          1 MiB writes straight to the origin), the cache is fresh. Passthrough:
                          >= 0.9x.
  randread_4k_qd32_cold   4 KiB random read QD32 over 1 GiB (origin filled first), fresh cache:
                          nearly every read misses. Passthrough: >= 0.9x.
  randwrite_4k_qd32_full  4 KiB random write QD32 over 512 MiB (8x the cache), after an untimed
                          fill run of the same job (--fill seconds) so the cache is full and
                          writeback is the steady state. Write-absorbing: >= 0.95x.
  randrw_4k_qd32_full     4 KiB random 50/50 read/write QD32 over 512 MiB after the same fill;
                          read + write IOPS. Write-absorbing: >= 0.95x.
  randwrite_4k_qd1_room   4 KiB random write QD1 over 32 MiB (fits the cache). Helping: >= 5x.
  randread_4k_qd32_warm   4 KiB random read QD32 over 32 MiB (origin filled first) after one
                          read pass through the setup (4 KiB, every block once, in random
                          order: a sequential pass is a scan, which pmcache's sequential
                          cutoff keeps out of the cache). Helping: >= 5x.
  wt_randwrite_4k_qd32    4 KiB random write QD32 over 1 GiB with pmcache --mode writethrough
                          (nbdkit: cache=writethrough). Passthrough: >= 0.9x.
  randwrite_4k_qd32_flush32       (delay origin only; issue 15) 4 KiB random write QD32 over 32 MiB
                          (fits the cache) with fio --fsync=32: a FLUSH after every 32 writes,
                          so every 32 writes are an epoch that ordered writeback seals with an
                          origin flush of its own. Target >= 1.0x. fio's nbd engine sends
                          NBD_CMD_FLUSH for it, but (checked with nbdkit's log filter, fio 3.33)
                          not one: when the 32nd write is issued it fills every free queue slot
                          with FLUSHes, ~16 back to back at QD32, so the client sends about one
                          FLUSH per two writes, in bursts, and most of them seal an empty epoch.
  randwrite_4k_qd32_flush32_full  (delay origin only) the same over 512 MiB after an untimed
                          --fill run, so the cache is full and the steady state is writeback
                          bound. For information (no target).
  flaky_copy_1pct         nbdcopy --flush of a 160 MiB random file from /dev/shm into the export,
  flaky_copy_10pct        with the error filter on the origin failing 1% (10%) of reads and
                          writes (error-pread-rate, error-pwrite-rate; EIO after the delay).
                          Metric: seconds, and the ratio pmcache with errors / pmcache on the
                          same origin without errors (one error-free copy per origin model
                          serves both rows). Target <= 3x (1%), <= 10x (10%). A copy is stopped
                          after --copy-timeout seconds, or when pmcache makes no progress (its
                          write_bytes and writeback_bytes counters stay the same) for --stall
                          seconds, and reported as "> N s". The origin alone and the nbdkit cache
                          with errors are run too, for information: the origin alone is expected
                          to fail. In writeback mode pmcache answers FLUSH once the data is
                          persistent in the cache, so the copy ends when the last 64 MiB are in
                          the cache (the rest was written back during the copy to make room);
                          nbdkit's writeback cache writes all its dirty blocks on FLUSH.
For the flush rows the script also reports, per pmcache setup, the counters of `pmcache stats`
taken just before and just after the timed fio run (so over the ramp and the run): epochs
sealed per second (delta of `epoch`), epochs written back per second (delta of
`written_epoch`, empty epochs included), blocks written back per second (`writebacks`), waits
for space per second (`waits_for_space`), and `epochs_pending`, `oldest_pending_epoch_ms`,
`dirty`, `retained`, `free` at the end (pmcache-none keeps no W: its `written_epoch` stays 0).
Every pmcache cell keeps these deltas in the JSON (run_stats). Once per origin model the flush rows also measure
the origin's flush latency against a fresh origin alone, with libnbd's Python binding (one
connection, QD1, every request timed on its own): --probe-ops times of a 4 KiB random write
followed by a FLUSH (the FLUSH timed alone: what sealing one epoch costs on top of its writes),
then as many FLUSHes with no write between. (fio's own sync latency at QD1 with --fsync=1 read
2-27 us at the median on the same origin from run to run, so it is not used.) nbdkit's delay
filter has no flush delay, so on both models a FLUSH costs a round trip only; an ordered epoch
costs at least one round of origin writes plus one flush.
1 MiB rows report GiB/s, 4 KiB rows IOPS; ratios are of those. Each fio job runs --runtime
seconds after a 1 s ramp. With --reps N every cell runs N times (setups interleaved) and the
median is reported. A cell that fails (server does not start, fio errors or hangs past its
timeout, copy fails) is recorded with its command and error text, and the run goes on.

Usage: bench/origin_bench.py [--runtime S] [--reps N] [--cases A,B] [--origins delay,rate]
                             [--orders ordered[,none]] [--fill S] [--copy-timeout S] [--stall S]
                             [--rate-delay MS] [--probe-ops N] [--cache-size SIZE]
                             [--pmcache PATH] [--out FILE.json]
  --cases         only these rows (comma-separated labels; default all)
  --origins       origin models (default delay,rate)
  --orders        pmcache writeback orders to run (default ordered): "ordered,none" adds the
                  pmcache-none setup to every row, copies included. The pmcache setup passes no
                  --writeback-order, so the script still runs binaries from before the option.
  --fill          seconds of the untimed fill run of the *_full rows (default 3)
  --copy-timeout  bound on one nbdcopy (default 120)
  --stall         stop a pmcache copy after this many seconds without progress (default 15)
  --rate-delay    whole milliseconds of delay added to the rate origin (default 0)
  --probe-ops     requests of each kind in the flush-latency probe (default 2000)
  --cache-size    pmcache's cache and nbdkit's cache-max-size (default 64M; the rows' areas and
                  targets assume 64M: other sizes are for experiments)
  --pmcache       the pmcache binary (default target/release/pmcache under the repository)
  --out           write everything (raw numbers, ratios, failures, pmcache stats) as JSON
Example: python3 bench/origin_bench.py --reps 1 --runtime 5 --out origin.json
Needs: nbdkit (memory plugin; delay, rate, error and cache filters; nbd plugin), fio with the
nbd engine, nbdcopy (libnbd-bin), libnbd's Python binding for the flush rows (python3-libnbd:
this interpreter's or /usr/bin/python3's), and a release build (cargo build --release -p pmcache).
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbd_bench  # noqa: E402
from nbd_bench import uri_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGIN_SIZE = "1G"
CACHE_SIZE = ["64M"]  # set from --cache-size
COPY_SIZE = 160 << 20
RAMP_S = 1
ORIGIN_MODELS = {
    # name: nbdkit filters (first = nearest the client) and their parameters
    "delay": (["delay"], ["delay-read=1ms", "delay-write=1ms", "delay-zero=1ms", "delay-trim=1ms"]),
    "rate": (["rate"], ["rate=8G", "burstiness=0.1"]),  # --rate-delay adds a delay filter
}
RATE_DELAY_MS = [0]  # set from --rate-delay
# target kinds: (comparison, threshold)
TARGETS = {"passthrough": (">=", 0.9), "absorb": (">=", 0.95), "help": (">=", 5.0), "parity": (">=", 1.0),
           "info": None}
# pmcache stats counters whose change over a timed run is kept, and gauges kept at its end
RUN_COUNTERS = ("epoch", "written_epoch", "writebacks", "writeback_bytes", "writes", "waits_for_space")
RUN_GAUGES = ("epochs_pending", "oldest_pending_epoch_ms", "retained", "dirty", "free")
SETUPS = ["origin", "pmcache", "nbdcache"]  # main() inserts pmcache-none with --orders ordered,none
# pmcache setups and the extra serve arguments of each
PM_SETUPS = {"pmcache": [], "pmcache-none": ["--writeback-order", "none"]}
# pmcache (tracing) warning/error lines, nbdkit error lines, panics
LOG_PROBLEM = re.compile(r"^\S+\s+(WARN|ERROR)\s|^nbdkit: .*: error: |panicked")


class Row:
    """One fio workload row."""

    def __init__(self, label, rw, bs, qd, area, target, prep=None, fill_origin=None, mode="writeback",
                 extra=(), origins=None):
        self.label, self.rw, self.bs, self.qd, self.area = label, rw, bs, qd, area
        self.target = target
        self.extra = extra            # more fio arguments (of the fill run too)
        self.origins = origins        # origin models the row runs on (None: all)
        self.prep = prep              # None, "fill" (untimed run of the job) or "warm" (read pass)
        self.fill_origin = fill_origin  # area written straight to the origin before the cache starts
        self.mode = mode              # pmcache --mode / nbdkit cache=
        self.unit = "GiB/s" if bs == "1M" else "IOPS"


ROWS = [
    Row("seqwrite_1m_qd8", "write", "1M", 8, "1G", "absorb"),
    Row("seqread_1m_qd8_cold", "read", "1M", 8, "1G", "passthrough", fill_origin="1G"),
    Row("randread_4k_qd32_cold", "randread", "4k", 32, "1G", "passthrough", fill_origin="1G"),
    Row("randwrite_4k_qd32_full", "randwrite", "4k", 32, "512M", "absorb", prep="fill"),
    Row("randrw_4k_qd32_full", "randrw", "4k", 32, "512M", "absorb", prep="fill"),
    Row("randwrite_4k_qd1_room", "randwrite", "4k", 1, "32M", "help"),
    Row("randread_4k_qd32_warm", "randread", "4k", 32, "32M", "help", prep="warm", fill_origin="32M"),
    Row("wt_randwrite_4k_qd32", "randwrite", "4k", 32, "1G", "passthrough", mode="writethrough"),
    Row("randwrite_4k_qd32_flush32", "randwrite", "4k", 32, "32M", "parity", extra=("--fsync=32",),
        origins=("delay",)),
    Row("randwrite_4k_qd32_flush32_full", "randwrite", "4k", 32, "512M", "info", prep="fill",
        extra=("--fsync=32",), origins=("delay",)),
]
COPY_ROWS = [("flaky_copy_1pct", "1%", 3.0), ("flaky_copy_10pct", "10%", 10.0)]
ALL_LABELS = [r.label for r in ROWS] + [c[0] for c in COPY_ROWS]


class CellFailed(Exception):
    """A setup failed; the message says which command and how."""


def tail(path, n=15):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def wait_socket(path, proc, log, timeout=30):
    """nbd_bench's wait, failing the cell with the server's log tail."""
    nbd_bench.wait_socket(path, proc, timeout, fail=CellFailed, detail=lambda: tail(log))


class Servers:
    """Child servers of one cell, each stopped by its own PID (SIGTERM, bounded wait, SIGKILL)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.procs = []
        self.notes = []

    def log_path(self, name):
        return os.path.join(self.tmp, name + ".log")

    def start(self, name, args, env=None):
        sock = os.path.join(self.tmp, name + ".sock")
        full = [a.replace("{sock}", sock) for a in args]
        log_path = self.log_path(name)
        with open(log_path, "w") as log:
            p = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env)
        self.procs.append((name, p))
        wait_socket(sock, p, log_path)
        return sock, p

    def stop_all(self, grace=5):
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    self.notes.append(f"{name} (pid {p.pid}) ignored SIGTERM for {grace} s: killed")
                    print(f"  {self.notes[-1]}", file=sys.stderr, flush=True)
                    p.kill()
                    p.wait()
            elif p.returncode not in (0, -signal.SIGTERM):
                self.notes.append(f"{name} had exited with status {p.returncode}")
        self.procs = []


def run(cmd, timeout, what):
    """Run a command; CellFailed with its command and output on error or timeout."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"")[-2000:]
        raise CellFailed(f"{what} timed out after {timeout} s: {' '.join(cmd)}\n"
                         f"{out.decode(errors='replace') if isinstance(out, bytes) else out}")
    if r.returncode != 0:
        raise CellFailed(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return r


def fio(sock, rw, bs, qd, size, runtime=None, extra=(), timeout=None):
    """One fio job with the nbd engine; returns IOPS (read + write), bandwidth, latencies."""
    cmd = ["fio", "--name=job", "--ioengine=nbd", f"--uri={uri_of(sock)}", f"--rw={rw}", f"--bs={bs}",
           f"--iodepth={qd}", f"--size={size}", "--output-format=json", "--randrepeat=0", "--norandommap",
           *extra]
    if rw == "randrw":
        cmd.append("--rwmixread=50")
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}", f"--ramp_time={RAMP_S}"]
    r = run(cmd, timeout or (runtime or 0) + RAMP_S + 60, "fio")
    out = r.stdout
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError) as e:
        raise CellFailed(f"fio output unreadable ({e}): {' '.join(cmd)}\n{out[-2000:]}\n{r.stderr[-2000:]}")
    if job.get("error"):
        raise CellFailed(f"fio job error {job['error']}: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    res = {"iops": 0.0, "gib_s": 0.0}
    sync = job.get("sync", {})
    if sync.get("total_ios"):
        pct = sync["lat_ns"].get("percentile", {})
        res["flushes"] = sync["total_ios"]
        res["flushes_per_s"] = sync["total_ios"] / max(job["job_runtime"] / 1000, 1e-3)
        res["flush_p50_us"] = pct.get("50.000000", 0) / 1000
        res["flush_p99_us"] = pct.get("99.000000", 0) / 1000
        res["flush_mean_us"] = sync["lat_ns"]["mean"] / 1000
    for side in ("read", "write"):
        s = job[side]
        if s["io_bytes"] == 0 and s["total_ios"] == 0:
            continue
        pct = s["clat_ns"].get("percentile", {})
        res["iops"] += s["iops"]
        res["gib_s"] += s["bw_bytes"] / (1 << 30)
        res[f"{side}_iops"] = s["iops"]
        res[f"{side}_p50_us"] = pct.get("50.000000", 0) / 1000
        res[f"{side}_p99_us"] = pct.get("99.000000", 0) / 1000
        res[f"{side}_mean_us"] = s["clat_ns"]["mean"] / 1000
    return res


def origin_args(model, error_rate=None):
    filters, params = ORIGIN_MODELS[model]
    filters = list(filters)
    params = list(params)
    if model == "rate" and RATE_DELAY_MS[0]:
        d = f"{RATE_DELAY_MS[0]}ms"
        filters.append("delay")
        params += [f"delay-read={d}", f"delay-write={d}", f"delay-zero={d}", f"delay-trim={d}"]
    if error_rate:
        filters.append("error")  # nearest the plugin: a failing request still pays the delay
        params += [f"error-pread-rate={error_rate}", f"error-pwrite-rate={error_rate}"]
    return (["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}"]
            + [f"--filter={f}" for f in filters] + ["memory", ORIGIN_SIZE] + params)


class Cell:
    """One setup in front of one fresh origin, in its own directory; use as a context manager."""

    def __init__(self, root, name, model, setup, pmcache, mode="writeback", error_rate=None):
        self.tmp = tempfile.mkdtemp(prefix=name[:24] + "-", dir=root)
        self.servers = Servers(self.tmp)
        self.model, self.setup, self.pmcache, self.mode = model, setup, pmcache, mode
        self.error_rate = error_rate
        self.cache = os.path.join(self.tmp, "cache.pmem")
        self.origin_sock = None
        self.sock = None
        self.info = {}

    def __enter__(self):
        return self

    def start_origin(self):
        self.origin_sock, _ = self.servers.start("origin", origin_args(self.model, self.error_rate))
        self.sock = self.origin_sock
        return self.origin_sock

    def start_front(self):
        """Start the cache in front of the origin (nothing to do for the origin alone)."""
        if self.setup in PM_SETUPS:
            run([self.pmcache, "format", "--cache", self.cache, "--size", CACHE_SIZE[0], "--origin",
                 uri_of(self.origin_sock), "--assume-pmem", "--force"], 60, "pmcache format")
            self.sock, self.pm_proc = self.servers.start(
                "pmcache", [self.pmcache, "serve", "--cache", self.cache, "--socket", "{sock}",
                            "--assume-pmem", "--mode", self.mode, *PM_SETUPS[self.setup]])
        elif self.setup == "nbdcache":
            self.sock, self.nc_proc = self.servers.start(
                "nbdcache", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}", "--filter=cache",
                             "nbd", f"socket={self.origin_sock}", f"cache={self.mode}", "cache-on-read=true",
                             f"cache-max-size={CACHE_SIZE[0]}"],
                env=dict(os.environ, TMPDIR=self.tmp))
        return self.sock

    def log_path(self):
        """The log of the server in front (pmcache-none's server is also named pmcache)."""
        return self.servers.log_path("pmcache" if self.setup in PM_SETUPS else self.setup)

    def collect(self):
        """Server-side facts worth keeping: pmcache stats and log warnings, nbdkit cache file size."""
        if self.setup in PM_SETUPS and getattr(self, "pm_proc", None) and self.pm_proc.poll() is None:
            st = pm_stats(self.pmcache, self.cache)
            if st is not None:
                self.info["pmcache_stats"] = st
        if self.setup == "nbdcache" and getattr(self, "nc_proc", None) and self.nc_proc.poll() is None:
            fd_dir = f"/proc/{self.nc_proc.pid}/fd"
            try:
                for fd in os.listdir(fd_dir):
                    target = os.readlink(os.path.join(fd_dir, fd))
                    if target.startswith(self.tmp) and "(deleted)" in target:
                        st = os.stat(os.path.join(fd_dir, fd))
                        self.info["nbdcache_file_bytes"] = st.st_blocks * 512
            except OSError:
                pass

    def log_findings(self):
        """Warning and error lines from the server logs (first few, and how many)."""
        found = {}
        for name in ("pmcache", "nbdcache", "origin"):
            path = self.servers.log_path(name)
            if not os.path.exists(path):
                continue
            with open(path, errors="replace") as f:
                lines = [l.rstrip() for l in f if LOG_PROBLEM.search(l)
                         and "handshake" not in l]  # wait_socket's probe connects and hangs up
            if lines:
                found[name] = {"count": len(lines), "first": lines[:5], "last": lines[-3:]}
        return found

    def __exit__(self, *exc):
        try:
            self.collect()
        except Exception as e:  # facts are best effort
            self.info["collect_error"] = repr(e)
        self.servers.stop_all()
        if self.servers.notes:
            self.info["stop_notes"] = self.servers.notes
        logs = self.log_findings()
        if logs:
            self.info["log"] = logs
        shutil.rmtree(self.tmp, ignore_errors=True)
        return False


def run_fio_cell(root, model, row, setup, a):
    """Measure one row on one setup from a fresh state; returns a result dict (or error)."""
    mode = row.mode
    with Cell(root, f"{row.label}-{setup}", model, setup, a.pmcache, mode) as c:
        res = {}
        try:
            c.start_origin()
            if row.fill_origin:
                fio(c.origin_sock, "write", "1M", 8, row.fill_origin, extra=("--refill_buffers",), timeout=120)
            sock = c.start_front()
            if row.prep == "fill":
                t0 = time.time()
                fio(sock, row.rw, row.bs, row.qd, row.area, runtime=a.fill, extra=row.extra, timeout=a.fill + 60)
                res["fill_s"] = round(time.time() - t0, 2)
            elif row.prep == "warm":
                t0 = time.time()
                # Every block once, in random order: a sequential pass is a
                # scan, which the sequential cutoff rightly keeps out.
                fio(sock, "randread", "4k", 32, row.area, extra=("--norandommap=0",), timeout=120)
                res["warm_s"] = round(time.time() - t0, 2)
            before = pm_stats(a.pmcache, c.cache) if setup in PM_SETUPS else None
            t0 = time.time()
            res.update(fio(sock, row.rw, row.bs, row.qd, row.area, runtime=a.runtime, extra=row.extra))
            if before is not None:
                res["run_stats"] = run_stats(before, pm_stats(a.pmcache, c.cache), time.time() - t0)
        except CellFailed as e:
            res["error"] = str(e)
            if setup != "origin":
                res["server_log_tail"] = tail(c.log_path())
    res.update(c.info)
    return res


def run_stats(before, after, seconds):
    """What pmcache's counters did over a timed run: deltas, per-second rates, end gauges."""
    if after is None:
        return {"error": "pmcache stats failed after the run"}
    out = {"seconds": round(seconds, 3)}
    for k in RUN_COUNTERS:
        if k in before and k in after:
            out[k] = after[k] - before[k]
            out[k + "_per_s"] = out[k] / seconds
    out["end"] = {k: after[k] for k in RUN_GAUGES if k in after}
    return out


# Run by a Python that has libnbd's binding (argv: URI, count); prints JSON latencies in us.
PROBE = r"""
import json, random, statistics, sys, time
import nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
n, buf = int(sys.argv[2]), bytearray(4096)
blocks = h.get_size() // 4096
write, flush, only = [], [], []
for _ in range(n):
    t0 = time.perf_counter()
    h.pwrite(buf, random.randrange(blocks) * 4096)
    t1 = time.perf_counter()
    h.flush()
    write.append(t1 - t0)
    flush.append(time.perf_counter() - t1)
for _ in range(n):
    t0 = time.perf_counter()
    h.flush()
    only.append(time.perf_counter() - t0)
h.shutdown()
def pct(v, p):
    return sorted(v)[min(len(v) - 1, int(p * len(v)))] * 1e6
out = {}
for name, v in (("write", write), ("flush", flush), ("flush_only", only)):
    out.update({name + "_p50_us": pct(v, 0.5), name + "_p99_us": pct(v, 0.99),
                name + "_mean_us": statistics.mean(v) * 1e6})
print(json.dumps(out))
"""


def nbd_python():
    """A Python interpreter that can import libnbd's binding (this one, or the system's)."""
    for exe in (sys.executable, "/usr/bin/python3"):
        if os.path.exists(exe) and subprocess.run([exe, "-c", "import nbd"], capture_output=True).returncode == 0:
            return exe
    return None


def flush_probe(root, model, a):
    """The origin's flush latency (see PROBE), against a fresh origin alone."""
    exe = nbd_python()
    if exe is None:
        return {"error": "no Python with libnbd's binding (apt-get install -y python3-libnbd)"}
    with Cell(root, "flush-probe", model, "origin", a.pmcache) as c:
        try:
            sock = c.start_origin()
            r = run([exe, "-c", PROBE, uri_of(sock), str(a.probe_ops)], 600, "flush probe")
            res = json.loads(r.stdout)
        except (CellFailed, ValueError) as e:
            res = {"error": str(e)}
    return res


def pm_stats(pmcache, cache):
    """The running server's counters (pmcache stats --json), or None."""
    try:
        r = subprocess.run([pmcache, "stats", "--cache", cache, "--json"], capture_output=True, text=True,
                           timeout=10)
        return json.loads(r.stdout) if r.returncode == 0 else None
    except (subprocess.TimeoutExpired, json.JSONDecodeError):
        return None


def nbdcopy(src, sock, timeout, progress=None, stall=None):
    """Copy src into the export and flush it.

    Returns (seconds, None) or (None, error text). progress() (optional) returns a value that
    changes while the server makes progress; if it stays the same for `stall` seconds the copy
    is stopped and reported as stalled (so a stuck setup costs `stall` seconds, not `timeout`).
    """
    cmd = ["nbdcopy", "--flush", src, uri_of(sock)]
    t0 = time.time()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last, last_change = None, t0
    why = None
    while p.poll() is None:
        now = time.time()
        if now - t0 > timeout:
            why = f"> {timeout} s (timed out)"
            break
        if progress is not None:
            v = progress()
            if v != last:
                last, last_change = v, now
            elif now - last_change > stall:
                why = (f"> {now - t0:.0f} s (stalled: no progress for {stall} s, "
                       f"since t={last_change - t0:.0f} s; last counters {last})")
                break
        time.sleep(0.5)
    if why:
        p.kill()
        p.communicate()
        return None, f"{why}: {' '.join(cmd)}"
    _, err = p.communicate()
    dt = time.time() - t0
    if p.returncode != 0:
        return None, f"failed ({p.returncode}) after {dt:.1f} s: {' '.join(cmd)}\n{err.strip()[-1500:]}"
    return dt, None


def run_copy_cell(root, model, setup, error_rate, src, a):
    label = f"copy-{setup}-{(error_rate or '0').rstrip('%')}"
    with Cell(root, label, model, setup, a.pmcache, error_rate=error_rate) as c:
        res = {"error_rate": error_rate or "0%"}
        try:
            c.start_origin()
            sock = c.start_front()
            progress = None
            if setup in PM_SETUPS:
                def progress():
                    st = pm_stats(a.pmcache, c.cache) or {}
                    return (st.get("write_bytes"), st.get("writeback_bytes"))
            t0 = time.time()
            secs, err = nbdcopy(src, sock, a.copy_timeout, progress, a.stall)
            if err:
                res["error"] = err
                res["timed_out"] = err.startswith(">")
                res["gave_up_after_s"] = round(time.time() - t0, 1)
                if setup != "origin":
                    res["server_log_tail"] = tail(c.log_path())
            else:
                res["seconds"] = secs
        except CellFailed as e:
            res["error"] = str(e)
    res.update(c.info)
    return res


def median(runs, key):
    ok = [r for r in runs if key in r and "error" not in r]
    if not ok:
        return runs[0] if runs else {"error": "not run"}
    order = sorted(ok, key=lambda r: r[key])
    pick = dict(order[len(order) // 2])
    if len(ok) < len(runs):
        pick["failed_reps"] = [r["error"] for r in runs if "error" in r]
    return pick


def metric(row, r):
    if "error" in r:
        return None
    return r["gib_s"] if row.unit == "GiB/s" else r["iops"]


def verdict(value, target):
    if target is None:
        return "info"
    op, thr = target
    if value is None:
        return "n/a"
    ok = value >= thr if op == ">=" else value <= thr
    return "pass" if ok else "**miss**"


def fmt_ratio(r):
    if r is None:
        return "n/a"
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.3f}x"


def fmt(v, unit):
    if v is None:
        return "FAIL"
    if unit == "GiB/s":
        return f"{v:.2f} GiB/s"
    if unit == "s":
        return f"{v:.1f} s"
    return f"{v:,.0f}"


def fio_rows(model, rows, a, root, results):
    for row in rows:
        if row.origins and model not in row.origins:
            continue
        runs = {s: [] for s in SETUPS}
        for rep in range(a.reps):
            for s in SETUPS:
                t0 = time.time()
                r = run_fio_cell(root, model, row, s, a)
                r["cell_s"] = round(time.time() - t0, 1)
                runs[s].append(r)
                v = metric(row, r)
                status = fmt(v, row.unit) if v is not None else "FAILED: " + r["error"].splitlines()[0][:150]
                print(f"  {model:5} {row.label:24} {s:12} rep {rep + 1}: {status}  ({r['cell_s']} s)", flush=True)
        key = "gib_s" if row.unit == "GiB/s" else "iops"
        case = {s: median(runs[s], key) for s in SETUPS}
        case["runs"] = runs
        case["unit"] = row.unit
        vals = {s: metric(row, case[s]) for s in SETUPS}
        pm = vals["pmcache"]
        case["pmcache_vs_origin"] = pm / vals["origin"] if pm is not None and vals["origin"] else None
        case["pmcache_vs_nbdcache"] = pm / vals["nbdcache"] if pm is not None and vals["nbdcache"] else None
        if "pmcache-none" in vals:
            none = vals["pmcache-none"]
            case["none_vs_origin"] = none / vals["origin"] if none is not None and vals["origin"] else None
            case["ordered_vs_none"] = pm / none if pm is not None and none else None
        target = TARGETS[row.target]
        case["target"] = f"pmcache/origin {target[0]} {target[1]}x ({row.target})" if target else "information"
        case["result"] = verdict(case["pmcache_vs_origin"], target)
        if pm is None:
            case["result"] = "**miss** (pmcache failed)"
        results["origins"][model]["rows"][row.label] = case


def copy_rows(model, copies, a, root, results, src):
    """The flaky copies: pmcache with errors against pmcache without; the others for information.

    With --orders ordered,none, pmcache-none runs every copy pmcache runs, and its own error-free
    copy is its reference."""
    out = results["origins"][model]["rows"]
    pms = [s for s in SETUPS if s in PM_SETUPS]
    base_runs = {s: [] for s in pms}
    for rep in range(a.reps):
        for s in pms:
            r = run_copy_cell(root, model, s, None, src, a)
            base_runs[s].append(r)
            print(f"  {model:5} {'copy, no errors':24} {s:12} rep {rep + 1}: "
                  f"{fmt(r.get('seconds'), 's') if 'seconds' in r else 'FAILED: ' + r['error'].splitlines()[0][:150]}",
                  flush=True)
    bases = {s: median(base_runs[s], "seconds") for s in pms}
    base = bases["pmcache"]
    ref = run_copy_cell(root, model, "origin", None, src, a)
    print(f"  {model:5} {'copy, no errors':24} origin      : "
          f"{fmt(ref.get('seconds'), 's') if 'seconds' in ref else 'FAILED: ' + ref['error'].splitlines()[0][:150]}",
          flush=True)
    for label, rate, limit in copies:
        runs = {s: [] for s in SETUPS}
        for rep in range(a.reps):
            for s in pms + ["origin", "nbdcache"]:
                if s not in PM_SETUPS and rep > 0:
                    continue  # the peers are for information only
                r = run_copy_cell(root, model, s, rate, src, a)
                runs[s].append(r)
                status = fmt(r["seconds"], "s") if "seconds" in r else "FAILED: " + r["error"].splitlines()[0][:150]
                print(f"  {model:5} {label:24} {s:12} rep {rep + 1}: {status}", flush=True)
        case = {s: median(runs[s], "seconds") for s in SETUPS}
        case["runs"] = runs
        case["pmcache_no_errors"] = base
        case["pmcache_no_errors_runs"] = base_runs["pmcache"]
        if "pmcache-none" in pms:
            nb = bases["pmcache-none"]
            case["none_no_errors"] = nb
            case["none_no_errors_runs"] = base_runs["pmcache-none"]
            ns = case["pmcache-none"].get("seconds")
            case["none_errors_vs_no_errors"] = ns / nb["seconds"] if ns is not None and nb.get("seconds") else None
            pm = case["pmcache"].get("seconds")
            case["ordered_vs_none"] = pm / ns if pm is not None and ns else None  # seconds: <= 1 is no cost
        case["origin_no_errors"] = ref
        case["unit"] = "s"
        pm, b = case["pmcache"].get("seconds"), base.get("seconds")
        case["errors_vs_no_errors"] = pm / b if pm is not None and b else None
        case["target"] = f"pmcache with errors / without <= {limit}x"
        if pm is None and case["pmcache"].get("timed_out") and b:
            case["errors_vs_no_errors_lower_bound"] = case["pmcache"]["gave_up_after_s"] / b
        case["result"] = verdict(case["errors_vs_no_errors"], ("<=", limit))
        if case["errors_vs_no_errors"] is None:
            err = case["pmcache"].get("error", "")
            case["result"] = ("**miss** (stalled)" if "stalled" in err else
                              "**miss** (timed out)" if case["pmcache"].get("timed_out") else
                              "**miss** (failed)" if err else "n/a")
        out[label] = case


def table(results, models, rows, copies):
    names = {"nbdcache": "nbdkit-cache"}
    none = "pmcache-none" in SETUPS
    head = ["origin", "row", "unit"] + [names.get(s, s) for s in SETUPS] + ["pmcache/origin"]
    head += ["pmcache-none/origin", "pmcache/pmcache-none (cost of order)"] if none else []
    head += ["pmcache/nbdkit-cache", "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for model in models:
        got = results["origins"][model]["rows"]
        for row in rows:
            if row.label not in got:
                continue  # a row for other origin models
            c = got[row.label]
            cells = [model, row.label, row.unit] + [fmt(metric(row, c[s]), row.unit) for s in SETUPS]
            cells.append(fmt_ratio(c["pmcache_vs_origin"]))
            if none:
                cells += [fmt_ratio(c.get("none_vs_origin")), fmt_ratio(c.get("ordered_vs_none"))]
            target = TARGETS[row.target]
            cells += [fmt_ratio(c["pmcache_vs_nbdcache"]), f"{target[0]} {target[1]}x" if target else "info",
                      c["result"]]
            lines.append("| " + " | ".join(cells) + " |")
    if copies:
        extra = (" | pmcache-none, no errors | pmcache-none, with errors | pmcache-none errors / no errors "
                 "| pmcache / pmcache-none, with errors" if none else "")
        lines += ["", "| origin | row | pmcache, no errors | pmcache, with errors | errors / no errors | target "
                  "| result | origin alone, with errors | nbdkit-cache, with errors" + extra + " |",
                  "|---" * (13 if none else 9) + "|"]

        def cell(r):
            if "seconds" in r:
                return f"{r['seconds']:.1f} s"
            if r.get("timed_out"):
                return f"> {r['gave_up_after_s']:.0f} s" + (" (stalled)" if "stalled" in r["error"] else "")
            return "FAIL"

        for model in models:
            got = results["origins"][model]["rows"]
            for label, _, limit in copies:
                c = got[label]
                ratio = c["errors_vs_no_errors"]
                if ratio is not None:
                    rs = f"{ratio:.2f}x"
                elif "errors_vs_no_errors_lower_bound" in c:
                    rs = f"> {c['errors_vs_no_errors_lower_bound']:.1f}x"
                else:
                    rs = "n/a"
                line = (f"| {model} | {label} | {cell(c['pmcache_no_errors'])} | {cell(c['pmcache'])} | {rs} "
                        f"| <= {limit}x | {c['result']} | {cell(c['origin'])} | {cell(c['nbdcache'])} |")
                if none:
                    line += (f" {cell(c['none_no_errors'])} | {cell(c['pmcache-none'])} "
                             f"| {fmt_ratio(c['none_errors_vs_no_errors'])} | {fmt_ratio(c['ordered_vs_none'])} |")
                lines.append(line)
    return "\n".join(lines)


def flush_table(results, models, rows):
    """The flush rows: what the client sent, what writeback did, against the origin's flush latency."""
    lines = ["| origin | row | setup | IOPS | client FLUSH/s | epochs sealed/s | writes per sealed epoch "
             "| epochs written back/s | blocks written back/s | waits for space/s | at the end: epochs pending, "
             "oldest (ms), dirty, retained, free |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    probes = []
    for model in models:
        o = results["origins"][model]
        for row in rows:
            if "--fsync=32" not in row.extra or row.label not in o["rows"]:
                continue
            c = o["rows"][row.label]
            for s in [x for x in SETUPS if x != "nbdcache"]:
                r = c[s]
                if "error" in r:
                    lines.append(f"| {model} | {row.label} | {s} | FAIL | | | | | | | |")
                    continue
                st = r.get("run_stats", {})
                end = st.get("end", {})

                def rate(k):
                    return f"{st[k + '_per_s']:,.0f}" if k + "_per_s" in st else ""
                tail_ = (", ".join(f"{end[k]:,}" for k in ("epochs_pending", "oldest_pending_epoch_ms", "dirty",
                                                             "retained", "free"))
                         if "epochs_pending" in end else "")
                per = f"{st['writes'] / st['epoch']:.1f}" if st.get("epoch") else ""
                lines.append(f"| {model} | {row.label} | {s} | {r['iops']:,.0f} | {r.get('flushes_per_s', 0):,.0f} | "
                             f"{rate('epoch')} | {per} | {rate('written_epoch')} | {rate('writebacks')} | "
                             f"{rate('waits_for_space')} | {tail_} |")
        p = o.get("flush_probe")
        if p and "error" not in p:
            flush, write = p["flush_p50_us"], p["write_p50_us"]
            probes.append(f"{model}: origin alone at QD1: FLUSH after a 4 KiB write p50 {flush:.0f} us "
                          f"(mean {p['flush_mean_us']:.0f}, p99 {p['flush_p99_us']:.0f}); FLUSH alone p50 "
                          f"{p['flush_only_p50_us']:.0f} us; 4 KiB write p50 {write:.0f} us. 1 / FLUSH = "
                          f"{1e6 / flush:,.0f}/s; 1 / (write + FLUSH) = {1e6 / (write + flush):,.0f}/s")
        elif p:
            probes.append(f"{model}: flush probe FAILED: {p['error'].splitlines()[0]}")
    return "\n".join(lines + [""] + probes) if len(lines) > 2 else ""


def failures(results):
    """Every failed cell: (origin model, row, setup, error text)."""
    out = []
    for model, o in results["origins"].items():
        for label, c in o["rows"].items():
            for s, runs in c.get("runs", {}).items():
                for r in runs:
                    if "error" in r:
                        expected = label.startswith("flaky_copy") and s not in PM_SETUPS
                        out.append((model, label, s + (" (expected: no retries)" if expected else ""), r["error"]))
            for s, key in (("pmcache", "pmcache_no_errors_runs"), ("pmcache-none", "none_no_errors_runs")):
                for r in c.get(key, []):
                    if "error" in r:
                        out.append((model, label, s + " (no errors)", r["error"]))
    return out


def make_source(root):
    path = os.path.join(root, "copy-src.bin")
    with open(path, "wb") as f:
        for _ in range(COPY_SIZE >> 20):
            f.write(os.urandom(1 << 20))
    return path


def main():
    ap = argparse.ArgumentParser(description="pmcache origin-path benchmark matrix (see the docstring)")
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--cases", default="")
    ap.add_argument("--origins", default="delay,rate")
    ap.add_argument("--orders", default="ordered")
    ap.add_argument("--fill", type=int, default=3)
    ap.add_argument("--copy-timeout", type=int, default=120)
    ap.add_argument("--stall", type=int, default=15)
    ap.add_argument("--rate-delay", type=int, default=0, metavar="MS")
    ap.add_argument("--probe-ops", type=int, default=2000)
    ap.add_argument("--cache-size", default="64M")
    ap.add_argument("--pmcache", default=os.path.join(ROOT, "target", "release", "pmcache"))
    ap.add_argument("--out")
    a = ap.parse_args()
    a.pmcache = os.path.abspath(a.pmcache)
    RATE_DELAY_MS[0] = a.rate_delay
    CACHE_SIZE[0] = a.cache_size
    wanted = [c for c in a.cases.split(",") if c]
    bad = [c for c in wanted if c not in ALL_LABELS]
    if bad:
        sys.exit(f"no such case {', '.join(bad)}: choose from {', '.join(ALL_LABELS)}")
    rows = [r for r in ROWS if not wanted or r.label in wanted]
    copies = [c for c in COPY_ROWS if not wanted or c[0] in wanted]
    models = [m for m in a.origins.split(",") if m]
    if not models or any(m not in ORIGIN_MODELS for m in models):
        sys.exit(f"--origins: choose from {', '.join(ORIGIN_MODELS)}")
    orders = [o for o in a.orders.split(",") if o]
    if "ordered" not in orders or any(o not in ("ordered", "none") for o in orders):
        sys.exit("--orders: ordered (the pmcache setup), optionally with none (the pmcache-none setup)")
    if "none" in orders:
        SETUPS.insert(SETUPS.index("pmcache") + 1, "pmcache-none")
    for tool in ("nbdkit", "fio", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install -y nbdkit fio libnbd-bin)")
    if not os.path.exists(a.pmcache):
        sys.exit(f"{a.pmcache} not found: cargo build --release -p pmcache")

    results = {"runtime_s": a.runtime, "ramp_s": RAMP_S, "reps": a.reps, "fill_s": a.fill,
               "copy_timeout_s": a.copy_timeout, "stall_s": a.stall, "cache_size": CACHE_SIZE[0],
               "origin_size": ORIGIN_SIZE,
               "copy_bytes": COPY_SIZE, "pmcache": a.pmcache, "setups": SETUPS,
               "origin_models": {m: " ".join(origin_args(m)) for m in models}, "origins": {}}
    root = tempfile.mkdtemp(prefix="pmob-", dir="/dev/shm")
    t_start = time.time()
    try:
        src = make_source(root) if copies else None
        for model in models:
            results["origins"][model] = {"rows": {}}
            print(f"origin model {model}: {' '.join(origin_args(model))}", flush=True)
            if any("--fsync=32" in r.extra and (not r.origins or model in r.origins) for r in rows):
                p = flush_probe(root, model, a)
                results["origins"][model]["flush_probe"] = p
                print(f"  {model:5} {'flush probe (origin)':24} " + (
                      f"FLUSH p50 {p['flush_p50_us']:.0f} us (alone {p['flush_only_p50_us']:.0f} us), "
                      f"write p50 {p['write_p50_us']:.0f} us"
                      if "error" not in p else "FAILED: " + p["error"].splitlines()[0][:150]), flush=True)
            fio_rows(model, rows, a, root, results)
            if copies:
                copy_rows(model, copies, a, root, results, src)
    except KeyboardInterrupt:
        print("interrupted: reporting what ran", file=sys.stderr)
        results["interrupted"] = True
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results["elapsed_s"] = round(time.time() - t_start, 1)
    done = [m for m in models if m in results["origins"]]
    ran_rows = [r for r in rows if all(r.label in results["origins"][m]["rows"]
                                       for m in done if not r.origins or m in r.origins)]
    ran_copies = [c for c in copies if all(c[0] in results["origins"][m]["rows"] for m in done)]
    md = table(results, done, ran_rows, ran_copies)
    fl = flush_table(results, done, ran_rows)
    if fl:
        md += "\n\n" + fl
    results["table_md"] = md
    print()
    print(md)
    fails = failures(results)
    results["failures"] = [{"origin": m, "row": l, "setup": s, "error": e} for m, l, s, e in fails]
    if fails:
        print("\nFailed cells:")
        for m, l, s, e in fails:
            print(f"- {m} {l} {s}: {e.splitlines()[0] if e else ''}")
    print(f"\nwhole matrix: {results['elapsed_s']:.0f} s")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
