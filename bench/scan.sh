#!/usr/bin/env bash
# Benchmark: one scan pass (a point with nothing changed) of a 2 GiB ext4 image with real
# files, protected once as the image file and once as a loop device over the same image
# (read with direct I/O), interleaved in one run. Peers in the same run: dd of the device
# with direct I/O (what the device gives) and cat of the image (what the page cache gives).
# Prints per pass: wall time, MB read, MB/s, agent CPU seconds; and each agent's peak RSS.
# Needs root (losetup), mkfs.ext4, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_MIB=${SIZE_MIB:-2048}
ROUNDS=${ROUNDS:-3}
. bench/lib.sh
need_tools mkfs.ext4 losetup python3 dd
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-bench.XXXXXX)
cleanup() {
  kill "${A_FILE:-}" "${A_DEV:-}" "${SERVER:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  [ -n "${DEV:-}" ] && losetup -d "$DEV"
  rm -rf "$W"
}
trap cleanup EXIT

echo "== preparing a ${SIZE_MIB} MiB ext4 image with real files"
make_image "$W/disk.img" "$SIZE_MIB"
sync
DEV=$(losetup -f --show "$W/disk.img")
echo "image: $(du -h --apparent-size "$W/disk.img" | cut -f1) apparent, $(du -h "$W/disk.img" | cut -f1) allocated; device $DEV"

"$B/process-server" init --data-dir "$W/ps" >/dev/null
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps.out" 2>"$W/ps.log" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps.out")" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"

# agent VM PATH: starts an agent for VM on PATH; a device needs a freeze for a consistent
# cut, so both get no-op hooks (the bench measures the pass, not a file system freeze).
agent() {
  "$B/drctl" enroll agent --vm "$1" --out "$W/$1.bundle" >/dev/null
  "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/$1.bundle" --vm "$1" \
    --disk "sda=$2" --state-dir "$W/st-$1" --interval 1h --freeze true --thaw true 2>"$W/$1.log" &
}
agent file "$W/disk.img"; A_FILE=$!
agent dev "$DEV"; A_DEV=$!
echo "== initial syncs"
for vm in file dev; do
  until "$B/drctl" status "$vm" --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.05; done
done

# pass VM PID: one point with nothing changed; prints "seconds MB-read MB/s cpu-seconds".
pass() {
  local c0 c1 t0 t1 mb
  c0=$(cpu "$2"); t0=$(now)
  "$B/drctl" checkpoint "$1" --wait >/dev/null
  t1=$(now); c1=$(cpu "$2")
  mb=$(grep 'scan pass done' "$W/$1.log" | tail -1 | sed -n 's/.*read_mb=\([0-9]*\).*/\1/p')
  echo "$(calc "$t1-$t0") $mb $(calc "$mb*1.048576/($t1-$t0)") $(calc "$c1-$c0")"
}

echo "== passes (interleaved): seconds, MB read, MB/s, agent CPU s"
for r in $(seq "$ROUNDS"); do
  sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
  t0=$(now); dd if="$DEV" of=/dev/null bs=1M iflag=direct status=none; t1=$(now)
  echo "round $r  dd iflag=direct of the device: $(calc "$t1-$t0")s, $(calc "$SIZE_MIB*1.048576/($t1-$t0)") MB/s"
  echo "round $r  tern, loop device (direct):    $(pass dev $A_DEV)"
  t0=$(now); cat "$W/disk.img" >/dev/null; t1=$(now)
  echo "round $r  cat of the image file:         $(calc "$t1-$t0")s, $(calc "$SIZE_MIB*1.048576/($t1-$t0)") MB/s"
  echo "round $r  tern, image file (page cache): $(pass file $A_FILE)"
done
echo "== peak RSS (MiB): agent on the file $(hwm $A_FILE), agent on the device $(hwm $A_DEV)"
