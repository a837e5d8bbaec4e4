#!/bin/bash
# A file system with fsync on the default (msync-mode) server, against the origin alone.
#
# ext4 on the export (nbdfuse + loop device, as the interop tests do), fio 4 KiB random writes
# with an fsync after each (1 job and 8 jobs, 32 MiB files), first through nbdkit's file plugin
# serving a 1 GiB origin file, then through `pmcache serve` (256 MiB cache on the same disk,
# writeback, msync mode) over the same origin file; ROUNDS rounds, interleaved.
#
# Usage: bench/fs_bench.sh [RUNTIME_S] [ROUNDS]   (root; needs nbdkit, nbdfuse, fio, losetup,
#        mkfs.ext4 and a release build; PMCACHE_BIN=path for another build; DIR=a directory on
#        the disk under test, default a new one in /var/tmp)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PM=${PMCACHE_BIN:-$ROOT/target/release/pmcache}
RUNTIME=${1:-8}
ROUNDS=${2:-2}
DIR=${DIR:-$(mktemp -d /var/tmp/pmcache-fsbench-XXXXXX)}
ORIGIN=$DIR/origin.img

# One ext4 run over the NBD URI $1, labelled $2.
ext4_run() {
    local m=$DIR/m-$2 fp loop
    mkdir -p "$m/fuse" "$m/mnt"
    nbdfuse "$m/fuse/disk" "$1" & fp=$!
    for _ in $(seq 100); do [ -e "$m/fuse/disk" ] && break; sleep 0.1; done
    loop=$(losetup -f --show --direct-io=off "$m/fuse/disk")
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$loop"
    mount "$loop" "$m/mnt"
    sync
    for jobs in 1 8; do
        printf '%-8s fsync jobs=%s: ' "$2" "$jobs"
        fio --name=f --directory="$m/mnt" --rw=randwrite --bs=4k --size=32M --fsync=1 \
            --numjobs="$jobs" --group_reporting --time_based --runtime="$RUNTIME" \
            --ioengine=psync | grep -oE "IOPS=[0-9.k]+"
    done
    umount "$m/mnt"; losetup -d "$loop"; kill "$fp"; wait "$fp" 2>/dev/null || true
    rm -rf "$m"
}

fresh_origin() { rm -f "$ORIGIN"; truncate -s 1G "$ORIGIN"; }

for _ in $(seq "$ROUNDS"); do
    fresh_origin
    # The last round's nbdkit leaves its socket behind, which a new one refuses.
    rm -f "$DIR/o.sock" "$DIR/o.pid"
    nbdkit -U "$DIR/o.sock" -P "$DIR/o.pid" file "$ORIGIN"
    for _ in $(seq 50); do [ -S "$DIR/o.sock" ] && break; sleep 0.1; done
    ext4_run "nbd+unix:///?socket=$DIR/o.sock" origin
    op=$(cat "$DIR/o.pid"); kill "$op"
    for _ in $(seq 100); do kill -0 "$op" 2>/dev/null || break; sleep 0.1; done

    fresh_origin
    rm -f "$DIR/cache.pmem"
    "$PM" serve --cache "$DIR/cache.pmem" --cache-size 256MiB --origin "$ORIGIN" \
        --socket "$DIR/p.sock" > "$DIR/pmcache.log" 2>&1 & pm=$!
    for _ in $(seq 100); do [ -S "$DIR/p.sock" ] && break; sleep 0.1; done
    ext4_run "nbd+unix:///?socket=$DIR/p.sock" pmcache
    kill "$pm"; wait "$pm" || true
done
rm -rf "$DIR"
