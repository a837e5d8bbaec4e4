#!/usr/bin/env python3
"""Write benchmarks against the storage underneath, in one run (issue 13).

msync mode (the default on a machine without pmem): pmcache serve in writeback mode with
its cache and origin files on the local disk (--dir, default a new directory in /var/tmp),
against fio writing the same disk directly: psync + fdatasync after every write, one job and
32 jobs, files in the same directory.
  direct_1          fio psync, fdatasync=1, 1 job, 4 KiB random writes
  direct_32         the same with 32 jobs
  pmcache_qd1       fio nbd engine, 4 KiB random writes at QD1, into pmcache (msync mode)
  pmcache_qd32      the same at QD32
Cold reads in msync mode: the same server over a 1 GiB origin file of random data on the same
disk, a new 256 MiB cache for every run, against nbdkit's file plugin serving that origin file
(the origin alone); the origin's page cache is dropped before every run.
  origin_read_qd32  fio nbd engine, 4 KiB random reads at QD32 over 1 GiB, nbdkit file plugin
  pmcache_read_qd32 the same through pmcache (msync mode, cold cache)
  origin_read_qd1, pmcache_read_qd1   the same at QD1
Writethrough: an origin with 1 ms of latency (nbdkit memory + delay filter), alone and
behind pmcache --mode writethrough (cache in /dev/shm with --assume-pmem, so the cache
costs what it costs on pmem and the origin is the limit).
  origin_qd32       fio nbd engine, 4 KiB random writes at QD32, straight to the origin
  wt_qd32           the same through pmcache in writethrough mode

Each case runs RUNTIME seconds; with --reps N the setups of a group are interleaved N times
and the median is reported. Ratios: pmcache_qd32 / direct_32, pmcache_qd1 / direct_1,
wt_qd32 / origin_qd32.

Usage: bench/write_bench.py [--runtime SECONDS] [--reps N] [--dir DIR] [--out FILE.json]
Needs: nbdkit (memory plugin, delay filter), fio with the nbd engine, and a release build of
pmcache (cargo build --release -p pmcache).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nbd_bench import PMCACHE, Servers, fio, median_run, pm_stats, uri_of  # noqa: E402

WORKSET = "64M"
DIRECT_FILE = {1: "64M", 32: "16M"}
DELAY = "1ms"


def direct(directory, jobs, runtime):
    """fio psync random 4 KiB writes with an fdatasync after each, `jobs` writers."""
    cmd = ["fio", "--name=direct", f"--directory={directory}", "--ioengine=psync",
           "--rw=randwrite", "--bs=4k", "--fdatasync=1", f"--size={DIRECT_FILE[jobs]}",
           f"--numjobs={jobs}", "--group_reporting", "--time_based", f"--runtime={runtime}",
           "--ramp_time=1", "--randrepeat=0", "--norandommap", "--output-format=json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=runtime + 600)
    if r.returncode != 0:
        raise RuntimeError(f"fio failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    w = job["write"]
    return {"iops": w["iops"], "p50_us": w["clat_ns"].get("percentile", {}).get("50.000000", 0) / 1000}


def drop_page_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold_reads(s, disk, reps, runtime):
    """Cold 4 KiB random reads, msync-mode pmcache (new cache each run) vs nbdkit file."""
    origin_img = os.path.join(disk, "read-origin.img")
    with open(origin_img, "wb") as f:
        for _ in range(1024):
            f.write(os.urandom(1 << 20))
        os.fsync(f.fileno())
    origin, _ = s.start("file-origin", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}",
                                        "file", origin_img])

    def through_origin(qd):
        drop_page_cache(origin_img)
        return fio(origin, "randread", "4k", qd, runtime, size="1G")

    def through_pmcache(qd):
        cache = os.path.join(disk, "read-cache.pmem")
        for p in (cache, cache + ".sock"):
            if os.path.exists(p):
                os.remove(p)
        drop_page_cache(origin_img)
        pm, proc = s.start(f"pmcache-read-{qd}", [PMCACHE, "serve", "--cache", cache, "--cache-size",
                                                  "256MiB", "--origin", origin_img, "--socket", "{sock}"])
        try:
            return fio(pm, "randread", "4k", qd, runtime, size="1G")
        finally:
            proc.terminate()
            proc.wait(timeout=120)

    print("cold random reads, msync mode vs the origin file alone (nbdkit file):", flush=True)
    return run_group(reps, [
        ("origin_read_qd32", lambda: through_origin(32)),
        ("pmcache_read_qd32", lambda: through_pmcache(32)),
        ("origin_read_qd1", lambda: through_origin(1)),
        ("pmcache_read_qd1", lambda: through_pmcache(1)),
    ])


def run_group(reps, cases):
    """Interleave the cases `reps` times; the median run of each."""
    runs = {name: [] for name, _ in cases}
    for _ in range(reps):
        for name, f in cases:
            r = f()
            runs[name].append(r)
            print(f"  {name:13} {r['iops']:>9.0f} IOPS", flush=True)
    out = {}
    for name, _ in cases:
        m = dict(median_run(runs[name]))
        m["all_iops"] = [r["iops"] for r in runs[name]]
        out[name] = m
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", help="a directory on the disk under test (default: new one in /var/tmp)")
    ap.add_argument("--out")
    a = ap.parse_args()
    for tool in ("nbdkit", "fio"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is required (apt-get install -y nbdkit fio)")
    if not os.path.exists(PMCACHE):
        sys.exit("build pmcache first: cargo build --release -p pmcache")
    disk = a.dir or tempfile.mkdtemp(prefix="pmcache-wbench-", dir="/var/tmp")
    os.makedirs(disk, exist_ok=True)
    shm = tempfile.mkdtemp(prefix="pmcache-wbench-", dir="/dev/shm")
    s = Servers(shm)
    results = {"runtime_s": a.runtime, "reps": a.reps, "dir": disk, "workset": WORKSET}
    try:
        # msync mode: cache and origin on the local disk, as `pmcache serve` makes them.
        origin_img = os.path.join(disk, "origin.img")
        with open(origin_img, "wb") as f:
            f.truncate(1 << 30)
        cache = os.path.join(disk, "cache.pmem")
        pm, _ = s.start("pmcache", [PMCACHE, "serve", "--cache", cache, "--cache-size", "256MiB",
                                    "--origin", origin_img, "--socket", "{sock}"])
        for sub in ("d1", "d32"):
            os.makedirs(os.path.join(disk, sub), exist_ok=True)
        print("msync mode (cache on the local disk) vs fio psync + fdatasync on the same disk:",
              flush=True)
        msync = run_group(a.reps, [
            ("direct_1", lambda: direct(os.path.join(disk, "d1"), 1, a.runtime)),
            ("pmcache_qd1", lambda: fio(pm, "randwrite", "4k", 1, a.runtime, size=WORKSET)),
            ("direct_32", lambda: direct(os.path.join(disk, "d32"), 32, a.runtime)),
            ("pmcache_qd32", lambda: fio(pm, "randwrite", "4k", 32, a.runtime, size=WORKSET)),
        ])
        results["msync"] = msync
        results["pmcache_msync_stats"] = pm_stats(cache)
        s.stop_all()
        results["msync_reads"] = cold_reads(s, disk, a.reps, a.runtime)
        s.stop_all()

        # Writethrough over a 1 ms origin.
        origin, _ = s.start("origin", ["nbdkit", "--foreground", "--exit-with-parent", "-U", "{sock}",
                                       "--filter=delay", "memory", "1G", f"delay-write={DELAY}",
                                       f"delay-read={DELAY}", f"delay-zero={DELAY}",
                                       f"delay-trim={DELAY}"])
        wt, _ = s.start("wt", [PMCACHE, "serve", "--cache", os.path.join(shm, "wt.pmem"),
                               "--cache-size", "1G", "--assume-pmem", "--mode", "writethrough",
                               "--origin", uri_of(origin), "--socket", "{sock}"])
        print(f"writethrough vs the origin alone ({DELAY} per request):", flush=True)
        results["writethrough"] = run_group(a.reps, [
            ("origin_qd32", lambda: fio(origin, "randwrite", "4k", 32, a.runtime, size=WORKSET)),
            ("wt_qd32", lambda: fio(wt, "randwrite", "4k", 32, a.runtime, size=WORKSET)),
        ])
    finally:
        s.stop_all()
        shutil.rmtree(shm, ignore_errors=True)
        if not a.dir:
            shutil.rmtree(disk, ignore_errors=True)
    m, w, rd = results["msync"], results["writethrough"], results["msync_reads"]
    ratios = {
        "qd32_vs_32_fdatasync_writers": m["pmcache_qd32"]["iops"] / m["direct_32"]["iops"],
        "qd1_vs_1_fdatasync_writer": m["pmcache_qd1"]["iops"] / m["direct_1"]["iops"],
        "cold_read_qd32_vs_origin_file": rd["pmcache_read_qd32"]["iops"] / rd["origin_read_qd32"]["iops"],
        "cold_read_qd1_vs_origin_file": rd["pmcache_read_qd1"]["iops"] / rd["origin_read_qd1"]["iops"],
        "writethrough_qd32_vs_origin": w["wt_qd32"]["iops"] / w["origin_qd32"]["iops"],
    }
    results["ratios"] = ratios
    for k, v in ratios.items():
        print(f"{k:32} {v:.2f}x")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
