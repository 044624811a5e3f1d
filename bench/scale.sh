#!/usr/bin/env bash
# Benchmark: costs that should follow the data and the changes, not the size of the disk
# (issue 12). A sparse disk of DISK_GIB (default 64) holding DATA_MIB (default 1024) of
# random data in 4 MiB extents, scattered; and a dense disk of RANDOM_MIB (default 1024)
# of random data. Peers in the same run: qemu-img convert (test failover), b3sum (the
# output's BLAKE3), the hashing + compression pipeline limit (initial sync), and the same
# bytes through socat over mutual TLS (OpenSSL) with b3sum on both ends.
# Prints, per item, tern's figure, the peer's and the issue's target; the test failover
# waits until the process server's zero-subtree table covers the disk (a background
# warm-up once per data directory; its time is printed). JOURNAL_GIB (default
# 20) of journal are written for the start-up figure (needs that much free space twice over
# the random disk's size).
# Needs: qemu-img, b3sum, zstd, socat, openssl, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
DISK_GIB=${DISK_GIB:-64}
DATA_MIB=${DATA_MIB:-1024}
RANDOM_MIB=${RANDOM_MIB:-1024}
JOURNAL_GIB=${JOURNAL_GIB:-20}
. bench/lib.sh
need_tools qemu-img b3sum zstd socat openssl python3
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-scale.XXXXXX)
cleanup() { kill "${AGENT:-}" "${AGENT2:-}" "${SERVER:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT
# protect VM DISK LOG: starts the VM's agent (its pid in $PID) and waits for its first point.
protect() {
  "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/$1.bundle" --vm "$1" \
    --disk "sda=$2" --state-dir "$W/st-$1" --interval 1h 2>"$W/$3" &
  PID=$!
  until "$B/drctl" status "$1" --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.02; done
}
wbytes() { awk '/^write_bytes/ {print $2}' "/proc/$1/io"; }
# The agent commits its state when the point's ack reaches it, just after drctl's wait
# ends: its write count, once it has not moved for half a second.
settled_wbytes() {
  local a b
  a=$(wbytes "$1")
  while sleep 0.5; b=$(wbytes "$1"); [ "$a" != "$b" ]; do a=$b; done
  echo "$b"
}

echo "== a ${DISK_GIB} GiB sparse disk with ${DATA_MIB} MiB of data in scattered 4 MiB extents"
python3 - "$W/sparse.img" "$DISK_GIB" "$DATA_MIB" <<'PY'
import os, random, sys
path, gib, mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
size = gib << 30
fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
random.seed(12)
slots = random.sample(range(size // (4 << 20)), mib // 4)
for s in slots:
    os.pwrite(fd, os.urandom(4 << 20), s * (4 << 20))
os.fsync(fd)
PY
echo "allocated: $(du -h "$W/sparse.img" | cut -f1) of $(du -h --apparent-size "$W/sparse.img" | cut -f1)"

"$B/process-server" init --data-dir "$W/ps" >/dev/null
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps.out" 2>"$W/ps.log" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps.out")" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"
"$B/drctl" enroll agent --vm big --out "$W/big.bundle" >/dev/null
"$B/drctl" enroll agent --vm rnd --out "$W/rnd.bundle" >/dev/null

echo "== protect it"
t0=$(now)
protect big "$W/sparse.img" agent.log
AGENT=$PID
t1=$(now)
INIT=$(calc "$t1-$t0")
STATE=$(du -s --block-size=1 "$W/st-big" | cut -f1)
STATE_APPARENT=$(du -sb "$W/st-big" | cut -f1)
echo "initial sync ${INIT}s; agent state dir $STATE bytes allocated ($STATE_APPARENT apparent: the table is sparse)"

echo "== a point with nothing changed, then one after 100 scattered 4 KiB writes"
w0=$(settled_wbytes $AGENT); c0=$(cpu $AGENT); t0=$(now)
"$B/drctl" checkpoint big --wait >/dev/null
IDLE=$(calc "$(now)-$t0"); IDLE_CPU=$(calc "$(cpu $AGENT)-$c0"); w1=$(settled_wbytes $AGENT)
NOCHANGE=$((w1 - w0))
python3 - "$W/sparse.img" <<'PY'
import os, random, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
random.seed(13)
for p in random.sample(range(os.fstat(fd).st_size // 4096), 100):
    os.pwrite(fd, os.urandom(4096), p * 4096)
os.fsync(fd)
PY
w0=$(settled_wbytes $AGENT); "$B/drctl" checkpoint big --wait >/dev/null; w1=$(settled_wbytes $AGENT)
HUNDRED=$((w1 - w0))
AGENT_RSS=$(hwm $AGENT)
echo "state writes: nothing changed $NOCHANGE bytes, 100 pages changed $HUNDRED bytes; agent peak RSS ${AGENT_RSS} MiB"
echo "a point with nothing changed took ${IDLE}s (agent CPU ${IDLE_CPU}s: the pass over the whole disk)"

echo "== the zero-subtree table (the values of holes in a whole-disk BLAKE3, worked out once per data directory at nice 10)"
# 8-byte magic, then 2,080 bytes per 64 MiB of disk.
WANT_TABLE=$((8 + ((DISK_GIB << 30) / (64 << 20)) * 2080))
t0=$(now); WAIT_FROM=$SECONDS
until [ "$(stat -c %s "$W/ps/zero-subtrees" 2>/dev/null || echo 0)" -ge "$WANT_TABLE" ]; do
  if (( SECONDS - WAIT_FROM > 3600 )); then
    echo "the table did not cover the disk within an hour; the process server's log:" >&2
    tail -20 "$W/ps.log" >&2
    exit 1
  fi
  sleep 0.2
done
t1=$(now)
WARM=$(calc "$t1-$t0")
echo "table covers the disk ${WARM}s after the first point ($(stat -c %s "$W/ps/zero-subtrees") bytes)"

echo "== test failover against qemu-img convert of the same source"
sync
t0=$(now); qemu-img convert -f raw -O raw "$W/sparse.img" "$W/qemu.raw"; t1=$(now)
QEMU=$(calc "$t1-$t0"); rm -f "$W/qemu.raw"
S0=$(cpu $SERVER)
t0=$(now); "$B/drctl" test-failover big --output "$W/tfo" --json >"$W/tfo.json"; t1=$(now)
TFO=$(calc "$t1-$t0"); TFO_CPU=$(calc "$(cpu $SERVER)-$S0")
GOT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["blake3"])' "$W/tfo.json")
# --no-mmap: b3sum's mmap faults in every page of a hole (8 GiB of hole: 10.3 s mapped,
# 2.3 s read).
t0=$(now); WANT=$(b3sum --no-names --no-mmap "$W/tfo/sda.raw"); t1=$(now)
B3=$(calc "$t1-$t0")
[ "$WANT" = "$GOT" ] && B3OK=yes || B3OK=NO
echo "test failover ${TFO}s (server CPU ${TFO_CPU}s), qemu-img convert ${QEMU}s, b3sum of the output ${B3}s; vm.json blake3 = b3sum: $B3OK"
"$B/drctl" test-failover-cleanup big >/dev/null
kill $AGENT; wait $AGENT 2>/dev/null || true; unset AGENT

echo "== initial sync of ${RANDOM_MIB} MiB of random data against the pipeline limit"
head -c "$((RANDOM_MIB << 20))" /dev/urandom >"$W/rnd.img"
cat "$W/rnd.img" >/dev/null
t0=$(now); b3sum --num-threads 1 "$W/rnd.img" >/dev/null; t1=$(now)
zstd -q -1 -T1 -c "$W/rnd.img" >"$W/rnd.zst"; t2=$(now)
zstd -q -d -c "$W/rnd.zst" >/dev/null; t3=$(now)
b3sum --num-threads 1 "$W/rnd.img" >/dev/null; t4=$(now)
rm -f "$W/rnd.zst"
LIMIT=$(calc "($t4-$t0)/2")
# The receiver also writes and fsyncs every byte into its journal, on the same file
# system as $W, which the CPU limit leaves out: the same bytes through dd conv=fsync. No
# sync can end before its bytes are durable, nor before its hashing is done: the bound
# is the slower of the two (the two overlapping perfectly).
t0=$(now); dd if="$W/rnd.img" of="$W/rnd.dd" bs=1M conv=fsync status=none; t1=$(now)
rm -f "$W/rnd.dd"
WRITE=$(calc "$t1-$t0")
BOUND=$(calc "max($LIMIT, $WRITE)")
# A sync also moves every byte through TLS and the loopback, which the CPU limit leaves out
# too: the same bytes sent by socat over mutual TLS 1.3 (OpenSSL) to a socat on loopback,
# written to a file there (not synced). The peer limit is the work a replicator cannot
# skip, shared over 2 cores: socat's CPU on both ends plus a single-thread b3sum on each.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=localhost \
  -addext subjectAltName=DNS:localhost -keyout "$W/peer.key" -out "$W/peer.crt" 2>/dev/null
cat "$W/peer.key" "$W/peer.crt" >"$W/peer.pem"
read -r TLS_WALL TLS_USR TLS_SYS B3_CPU < <(python3 - "$W" <<'PY'
import os, resource, socket, subprocess, sys, time
w = sys.argv[1]
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
tls = f"cert={w}/peer.pem,cafile={w}/peer.crt,verify=1,openssl-min-proto-version=TLS1.3"
socat = ["timeout", "300", "socat", "-u", "-b", "262144"]
recv = subprocess.Popen(socat + [f"OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,{tls}", f"CREATE:{w}/rnd.tls"])
listening = f":{port:04X} 00000000:0000 0A"
deadline = time.time() + 10
while listening not in open("/proc/net/tcp").read():
    if recv.poll() is not None or time.time() > deadline:
        recv.terminate()  # timeout passes it on to socat
        sys.exit(f"the socat peer's listener did not start (exit {recv.poll()})")
    time.sleep(0.02)
t0 = time.time()
send = subprocess.run(socat + [f"FILE:{w}/rnd.img", f"OPENSSL:127.0.0.1:{port},{tls},commonname=localhost"])
rc = recv.wait()
wall = time.time() - t0
if send.returncode or rc:
    sys.exit(f"the socat peer failed (sender exit {send.returncode}, receiver exit {rc})")
r = resource.getrusage(resource.RUSAGE_CHILDREN)
subprocess.run(["b3sum", "--num-threads", "1", f"{w}/rnd.img"], stdout=subprocess.DEVNULL, check=True)
b = resource.getrusage(resource.RUSAGE_CHILDREN)
b3 = b.ru_utime + b.ru_stime - r.ru_utime - r.ru_stime
print(f"{wall:.2f} {r.ru_utime:.2f} {r.ru_stime:.2f} {b3:.2f}")
PY
)
cmp -s "$W/rnd.img" "$W/rnd.tls" || { echo "the socat peer did not carry the bytes whole"; exit 1; }
rm -f "$W/rnd.tls"
TLS_CPU=$(calc "$TLS_USR+$TLS_SYS")
PEER_CPU=$(calc "2*$B3_CPU+$TLS_CPU")
PEER=$(calc "$PEER_CPU/2")
echo "socat over mutual TLS ${TLS_WALL}s (CPU ${TLS_CPU}s both ends: user ${TLS_USR}s, system ${TLS_SYS}s); + b3sum on each end (CPU ${B3_CPU}s each): peer limit ${PEER}s"
S0=$(cpu $SERVER)
t0=$(now)
protect rnd "$W/rnd.img" agent2.log
AGENT2=$PID
t1=$(now)
RND=$(calc "$t1-$t0")
RND_A=$(cpu $AGENT2); RND_S=$(calc "$(cpu $SERVER)-$S0")
# The same comparison in CPU seconds (the process server's include answering the status
# polls of protect()).
RND_CPU=$(calc "$RND_A+$RND_S")
echo "tern CPU ${RND_CPU}s (agent ${RND_A}s, process server ${RND_S}s); the peer's ${PEER_CPU}s"
echo "tern ${RND}s, limit ${LIMIT}s, dd conv=fsync of the same bytes ${WRITE}s, the slower of the two ${BOUND}s, hash + TLS peer limit ${PEER}s"

echo "== process-server start-up over ${JOURNAL_GIB} GiB of journal (the random disk rewritten, a point each time)"
journal_bytes() { find "$W/ps/vms" -name '*.seg' -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}'; }
while [ "$(journal_bytes)" -lt $((JOURNAL_GIB << 30)) ]; do
  head -c "$((RANDOM_MIB << 20))" /dev/urandom | dd of="$W/rnd.img" bs=1M conv=notrunc,fsync status=none
  "$B/drctl" checkpoint rnd --wait >/dev/null
done
JOURNAL=$(journal_bytes)
kill $AGENT2; wait $AGENT2 2>/dev/null || true; unset AGENT2
kill $SERVER; wait $SERVER 2>/dev/null || true
t0=$(now)
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps2.out" 2>>"$W/ps.log" &
SERVER=$!
until grep -q listening "$W/ps2.out" 2>/dev/null; do sleep 0.01; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps2.out")"
# Ready once it answers: the store (catalog and journals) is open.
until "$B/drctl" status >/dev/null 2>&1; do sleep 0.01; done
t1=$(now)
STARTUP=$(calc "$t1-$t0")
echo "start-up ${STARTUP}s over $JOURNAL bytes of journal segments (page cache warm), until drctl status answers"

echo
echo "== summary (${DISK_GIB} GiB sparse disk, ${DATA_MIB} MiB of data)"
printf '%-52s %12s  %s\n' "agent peak RSS (MiB)" "$AGENT_RSS" "(target <= 64, whatever the disk size)"
printf '%-52s %12s  %s\n' "agent state dir (bytes allocated)" "$STATE" "(follows the data; apparent $STATE_APPARENT)"
printf '%-52s %12s  %s\n' "state bytes written, point with nothing changed" "$NOCHANGE" "(target <= 1 MiB)"
printf '%-52s %12s  %s\n' "state bytes written, point after 100 page writes" "$HUNDRED" "(target <= 4 MiB)"
printf '%-52s %12s  %s\n' "a point with nothing changed (s)" "$IDLE" "(agent CPU ${IDLE_CPU}s; follows the data)"
printf '%-52s %12s  %s\n' "zero-subtree table ready after the first point (s)" "$WARM" "(once per data directory, in the background)"
printf '%-52s %12s  %s\n' "test failover (s)" "$TFO" "(server CPU ${TFO_CPU}s)"
printf '%-52s %12s\n' "qemu-img convert (s)" "$QEMU"
printf '%-52s %12s  %s\n' "test failover / qemu-img convert" "$(calc "$TFO/$QEMU")" "(target <= 2)"
printf '%-52s %12s  %s\n' "vm.json blake3 equals b3sum of the output" "$B3OK" "(b3sum took ${B3}s)"
printf '%-52s %12s  %s\n' "random-data initial sync: limit / tern" "$(calc "$LIMIT/$RND")" "(target >= 0.80; CPU only)"
printf '%-52s %12s  %s\n' "  the same, bound: max(limit, durable write) / tern" "$(calc "$BOUND/$RND")" "(dd conv=fsync of the same bytes ${WRITE}s)"
printf '%-52s %12s  %s\n' "  the same, hash + TLS peer limit / tern" "$(calc "$PEER/$RND")" "(socat over mutual TLS ${TLS_WALL}s, CPU ${TLS_CPU}s; its file is not synced)"
printf '%-52s %12s  %s\n' "  the same in CPU seconds: peer / tern" "$(calc "$PEER_CPU/$RND_CPU")" "(tern ${RND_CPU}s, the peer ${PEER_CPU}s; proposed target >= 0.80)"
printf '%-52s %12s  %s\n' "process-server start-up (s)" "$STARTUP" "(target <= 5 with >= 20 GB; here $JOURNAL bytes of segments)"
