#!/usr/bin/env bash
# NBD over TLS (issue 16): pmcache serve --tls require against nbdkit's memory plugin with
# --tls=require and the same X.509 credentials (TLS 1.3, AES-GCM), fio's nbd engine over
# nbds://localhost TCP URIs, in one run; plus pmcache without TLS for the cost of TLS. (X.509,
# not PSK: libnbd refuses tls-psk-file in a URI unless the program allows local files, and fio
# does not; the CA comes from libnbd's default directory, $HOME/.pki/libnbd.) Cache in /dev/shm
# (--assume-pmem), origin a sparse file in /dev/shm, working set written first so reads hit.
# Usage: bench/tls_bench.sh [RUNTIME_S]   (needs nbdkit, fio, certtool; a release build, or
#        PMCACHE_BIN=path/to/pmcache for another build, e.g. to compare two commits)
set -euo pipefail
RT=${1:-5}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PM=${PMCACHE_BIN:-$ROOT/target/release/pmcache}
D=$(mktemp -d /dev/shm/pmtls-XXXXXX)
trap 'kill $(cat "$D"/*.pid 2>/dev/null) 2>/dev/null || true; sleep 0.5; rm -rf "$D"' EXIT
P=$D/pki; mkdir -p "$P" "$D/home/.pki/libnbd"
printf 'cn = bench CA\nca\ncert_signing_key\n' >"$D/ca.info"
printf 'cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\nsigning_key\n' >"$D/server.info"
certtool --generate-privkey --outfile "$P/ca-key.pem" 2>/dev/null
certtool --generate-self-signed --load-privkey "$P/ca-key.pem" --template "$D/ca.info" \
  --outfile "$P/ca-cert.pem" 2>/dev/null
certtool --generate-privkey --outfile "$P/server-key.pem" 2>/dev/null
certtool --generate-certificate --load-ca-certificate "$P/ca-cert.pem" --load-ca-privkey \
  "$P/ca-key.pem" --load-privkey "$P/server-key.pem" --template "$D/server.info" \
  --outfile "$P/server-cert.pem" 2>/dev/null
cp "$P/ca-cert.pem" "$D/home/.pki/libnbd/"
export HOME=$D/home
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
MP=$(port); PP=$(port)
truncate -s 1G "$D/origin.img" "$D/origin2.img"
nbdkit -i 127.0.0.1 -p "$MP" -P "$D/nbdkit.pid" --tls=require --tls-certificates="$P" memory 1G
"$PM" serve --cache "$D/cache.pmem" --cache-size 1G --assume-pmem --origin "$D/origin.img" \
  --listen "127.0.0.1:$PP" --tls require --tls-certificates "$P" >"$D/pm.log" 2>&1 &
echo $! >"$D/pm.pid"
"$PM" serve --cache "$D/cache2.pmem" --cache-size 1G --assume-pmem --origin "$D/origin2.img" \
  --socket "$D/plain.sock" >"$D/plain.log" 2>&1 &
echo $! >"$D/plain.pid"
for _ in $(seq 100); do [ -S "$D/plain.sock" ] && grep -q serving "$D/pm.log" && break; sleep 0.1; done
uri() {
  case $1 in
    plain) echo "nbd+unix:///?socket=$D/plain.sock" ;;
    pm) echo "nbds://localhost:$PP/" ;;
    mem) echo "nbds://localhost:$MP/" ;;
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
