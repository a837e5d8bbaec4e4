#!/usr/bin/env bash
# NBD over TLS (issue 16): pmcache serve --tls require against nbdkit's memory plugin with
# --tls=require and the same PSK, fio's nbd engine over nbds+unix URIs, in one run; plus
# pmcache without TLS for the cost of TLS. Cache in /dev/shm (--assume-pmem), origin a sparse
# file in /dev/shm, working set written first so reads hit.
# Usage: bench/tls_bench.sh [RUNTIME_S]   (needs nbdkit, fio, psktool; a release build)
set -euo pipefail
RT=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PM=$ROOT/target/release/pmcache
D=$(mktemp -d /dev/shm/pmtls-XXXXXX)
trap 'kill $(cat "$D"/*.pid 2>/dev/null) 2>/dev/null || true; sleep 0.5; rm -rf "$D"' EXIT
psktool -u bench -p "$D/keys.psk" >/dev/null
truncate -s 1G "$D/origin.img"
nbdkit -U "$D/mem.sock" -P "$D/nbdkit.pid" --tls=require --tls-psk="$D/keys.psk" memory 1G
"$PM" serve --cache "$D/cache.pmem" --cache-size 1G --assume-pmem --origin "$D/origin.img" \
  --socket "$D/pm.sock" --tls require --tls-psk "$D/keys.psk" >"$D/pm.log" 2>&1 &
echo $! >"$D/pm.pid"
"$PM" serve --cache "$D/cache2.pmem" --cache-size 1G --assume-pmem --origin "$D/origin2.img" \
  --socket "$D/plain.sock" >"$D/plain.log" 2>&1 &
echo $! >"$D/plain.pid"
for s in pm plain; do for _ in $(seq 100); do [ -S "$D/$s.sock" ] && break; sleep 0.1; done; done
uri() {
  case $1 in
    plain) echo "nbd+unix:///?socket=$D/plain.sock" ;;
    pm) echo "nbds+unix:///?socket=$D/pm.sock&tls-psk-file=$D/keys.psk&tls-username=bench" ;;
    mem) echo "nbds+unix:///?socket=$D/mem.sock&tls-psk-file=$D/keys.psk&tls-username=bench" ;;
  esac
}
job() { # setup rw bs qd [runtime]
  fio --name=j --ioengine=nbd --uri="$(uri "$1")" --rw="$2" --bs="$3" --iodepth="$4" --size=256M \
    --randrepeat=0 --norandommap --output-format=json ${5:+--time_based --runtime=$5} 2>/dev/null |
    python3 -c 'import json,sys; s=sys.stdin.read(); j=json.loads(s[s.index("{"):])["jobs"][0]
r=j["read"]; w=j["write"]; print("%.0f" % (r["iops"] + w["iops"]), "%.2f" % ((r["bw_bytes"] + w["bw_bytes"]) / 2**30))'
}
for s in mem pm plain; do job "$s" write 1M 8 >/dev/null; done
printf '%-18s %16s %16s %16s %8s %8s\n' case "nbdkit+TLS" "pmcache+TLS" "pmcache plain" "vs nbdkit" "TLS cost"
for c in "randread 4k 32" "randwrite 4k 32" "read 1M 8"; do
  set -- $c
  m=$(job mem "$1" "$2" "$3" "$RT"); p=$(job pm "$1" "$2" "$3" "$RT"); q=$(job plain "$1" "$2" "$3" "$RT")
  col=1; [ "$2" = 1M ] && col=2
  mv=$(echo "$m" | cut -d' ' -f$col); pv=$(echo "$p" | cut -d' ' -f$col); qv=$(echo "$q" | cut -d' ' -f$col)
  printf '%-18s %16s %16s %16s %8s %8s\n' "$1 $2 QD$3" "$mv" "$pv" "$qv" \
    "$(python3 -c "print('%.2fx' % ($pv / $mv))")" "$(python3 -c "print('%.2fx' % ($pv / $qv))")"
done
