#!/usr/bin/env bash
# Benchmark: initial sync and a 1 % incremental of a realistic 2 GiB ext4 image,
# mobility-agent -> process-server over loopback mTLS, with peers run in the same session:
#   pipeline limit: b3sum + zstd -1 -T1 + zstd -d + b3sum on the same image (the work agent
#                   and server share, on 2 cores: image size / (sum of times / 2))
#   rsync over loopback (daemon): whole-file for the initial copy, --inplace --no-whole-file
#                   for the incremental.
# Prints wall time, MB/s, CPU seconds and peak RSS of each tern process, bytes on the wire.
# Needs: mkfs.ext4, rsync, zstd, b3sum, python3 (Debian: e2fsprogs rsync zstd b3sum).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-2048}
. bench/lib.sh
need_tools mkfs.ext4 rsync zstd b3sum python3
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-bench.XXXXXX)
cleanup() { kill "${AGENT:-}" "${SERVER:-}" "${RSYNCD:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

if [ -n "${IMAGE:-}" ]; then  # IMAGE=PATH reuses an image (it is copied, not changed)
  cp --sparse=always "$IMAGE" "$W/disk.img"
else
  echo "== preparing a ${SIZE_MIB} MiB ext4 image with real files"
  make_image "$W/disk.img" "$SIZE_MIB"
fi
IMG_BYTES=$(stat -c %s "$W/disk.img")
echo "image: $(du -h --apparent-size "$W/disk.img" | cut -f1) apparent, $(du -h "$W/disk.img" | cut -f1) allocated"
sync

cat "$W/disk.img" >/dev/null  # every tool below reads from the page cache
echo "== peers: pipeline limit (single-thread b3sum, zstd -1, zstd -d, b3sum)"
t0=$(now); b3sum --num-threads 1 "$W/disk.img" >/dev/null; t1=$(now)
zstd -q -1 -T1 -c "$W/disk.img" >"$W/disk.zst"; t2=$(now)
zstd -q -d -c "$W/disk.zst" >/dev/null; t3=$(now)
b3sum --num-threads 1 "$W/disk.img" >/dev/null; t4=$(now)
rm -f "$W/disk.zst"
SUM=$(calc "$t4-$t0")
LIMIT_S=$(calc "$SUM/2")
echo "b3sum $(calc "$t1-$t0")s  zstd -1 $(calc "$t2-$t1")s  zstd -d $(calc "$t3-$t2")s  b3sum $(calc "$t4-$t3")s  -> limit $LIMIT_S s ($(calc "$IMG_BYTES/$LIMIT_S/1e6") MB/s)"

echo "== peers: rsync over loopback"
mkdir -p "$W/rsync-dst"
start_rsyncd "$W/rsync-dst"
t0=$(now); R1=$(rsync_sent "$W/disk.img" disk.img --whole-file); t1=$(now)
RSYNC_FULL=$(calc "$t1-$t0")
echo "rsync whole-file: ${RSYNC_FULL}s, $R1 bytes sent"

echo "== tern: initial sync"
"$B/process-server" init --data-dir "$W/ps" >/dev/null
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps.out" 2>"$W/ps.log" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps.out")" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"
"$B/drctl" enroll agent --vm bench --out "$W/agent.bundle" >/dev/null
S_CPU0=$(cpu $SERVER)
t0=$(now)
"$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/agent.bundle" --vm bench \
  --disk "sda=$W/disk.img" --state-dir "$W/agent-state" --interval 1h 2>"$W/agent.log" &
AGENT=$!
until "$B/drctl" status bench --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.02; done
t1=$(now)
INIT=$(calc "$t1-$t0")
INIT_WIRE=$("$B/drctl" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_received"])')
A_CPU1=$(cpu $AGENT); S_CPU1=$(cpu $SERVER)
echo "tern initial sync: ${INIT}s, $(calc "$IMG_BYTES/$INIT/1e6") MB/s of image, wire $INIT_WIRE bytes," \
  "CPU agent ${A_CPU1}s server $(calc "$S_CPU1-$S_CPU0")s"

echo "== the VM changes: 1 % of the 4 KiB pages rewritten with random data, scattered"
echo "$(scatter "$W/disk.img" 1 1) bytes changed"
CHANGED=$(( IMG_BYTES / 4096 / 100 * 4096 ))

t0=$(now); R2=$(rsync_sent "$W/disk.img" disk.img --inplace --no-whole-file); t1=$(now)
RSYNC_INC=$(calc "$t1-$t0")
echo "rsync --inplace --no-whole-file: ${RSYNC_INC}s, $R2 bytes sent"

W0=$("$B/drctl" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_received"])')
t0=$(now)
"$B/drctl" checkpoint bench --wait >/dev/null
t1=$(now)
INC=$(calc "$t1-$t0")
W1=$("$B/drctl" status bench --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["bytes_received"])')
A_CPU2=$(cpu $AGENT); S_CPU2=$(cpu $SERVER)
echo "tern 1% incremental (checkpoint --wait: full rescan + send + point): ${INC}s, wire $((W1-W0)) bytes," \
  "CPU agent $(calc "$A_CPU2-$A_CPU1")s server $(calc "$S_CPU2-$S_CPU1")s"

echo "== verify: test failover of the last point equals the image"
"$B/drctl" test-failover bench --output "$W/tfo" --json >"$W/tfo.json"
WANT=$(b3sum --no-names "$W/disk.img")
GOT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["blake3"])' "$W/tfo.json")
[ "$WANT" = "$GOT" ] && echo "byte for byte: OK ($GOT)" || { echo "MISMATCH: $WANT vs $GOT"; exit 1; }

echo
echo "== summary (image $IMG_BYTES bytes, changed $CHANGED bytes)"
printf '%-44s %10s\n' "initial sync, tern (s)" "$INIT"
printf '%-44s %10s\n' "pipeline limit (s)" "$LIMIT_S"
printf '%-44s %10s   (target >= 0.80)\n' "tern speed / pipeline limit" "$(calc "$LIMIT_S/$INIT")"
printf '%-44s %10s\n' "rsync whole-file (s)" "$RSYNC_FULL"
printf '%-44s %10s   (target > 1)\n' "tern speed / rsync whole-file" "$(calc "$RSYNC_FULL/$INIT")"
printf '%-44s %10s\n' "1% incremental, tern (s)" "$INC"
printf '%-44s %10s\n' "1% incremental, rsync --inplace (s)" "$RSYNC_INC"
printf '%-44s %10s   (target >= 5)\n' "tern speed / rsync incremental" "$(calc "$RSYNC_INC/$INC")"
printf '%-44s %10s   (target <= 1.5)\n' "tern wire bytes / changed bytes" "$(calc "($W1-$W0)/$CHANGED")"
printf '%-44s %10s\n' "rsync wire bytes / changed bytes" "$(calc "$R2/$CHANGED")"
printf '%-44s %10s   (target <= 64)\n' "agent peak RSS (MiB)" "$(hwm $AGENT)"
printf '%-44s %10s   (target <= 128)\n' "process server peak RSS (MiB)" "$(hwm $SERVER)"
