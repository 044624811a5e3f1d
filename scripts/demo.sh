#!/usr/bin/env bash
# tern demo: protect a sample ext4 disk image on loopback, change it, checkpoint,
# test-fail over to each point, then walk the whole circle — fail over, commit, reprotect
# to a master target, fail back, commit, reverse-replicate — verifying the disk at each step.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }
. bench/lib.sh # scatter: the VM's scattered writes

for tool in mkfs.ext4 qemu-img; do
  command -v "$tool" >/dev/null || { echo "demo needs $tool (Debian: e2fsprogs, qemu-utils)"; exit 1; }
done

step "building tern"
cargo build --quiet --workspace --bins --locked
B="$PWD/target/debug"

WORK=$(mktemp -d /tmp/tern-demo.XXXXXX)
cleanup() { kill "${AGENT_PID:-}" "${SERVER_PID:-}" "${MT_PID:-}" "${REC_PID:-}" 2>/dev/null || true; wait 2>/dev/null || true; }
same() { # same FILE1 FILE2 WHAT
  qemu-img compare -q -f raw -F raw "$1" "$2" && echo "verified: $3 (qemu-img compare: identical)"
}
wait_connected() {
  for _ in $(seq 200); do
    "$B/drctl" status web01 --json 2>/dev/null | grep -q '"agent_connected": true' && return; sleep 0.1
  done
  echo "the agent did not connect; see $WORK/*.log"; exit 1
}
trap cleanup EXIT
echo "working in $WORK (logs: $WORK/*.log)"

step "process-server init: a CA, the server identity and the admin bundle"
"$B/process-server" init --data-dir "$WORK/ps"

step "process-server serve on loopback"
"$B/process-server" serve --data-dir "$WORK/ps" --listen 127.0.0.1:0 >"$WORK/ps.out" 2>"$WORK/ps.log" &
SERVER_PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/ps.out" 2>/dev/null && break; sleep 0.1; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$WORK/ps.out")"
export TERN_ADMIN_IDENTITY="$WORK/ps/pki/admin.bundle"
echo "server: $TERN_SERVER"

step "a sample VM disk: a 64 MiB ext4 image with some files"
mkdir -p "$WORK/files"
cp -r /etc "$WORK/files/" 2>/dev/null || true
head -c 8M /dev/urandom >"$WORK/files/random.bin"
truncate -s 64M "$WORK/web01-sda.img"
mkfs.ext4 -q -F -d "$WORK/files" "$WORK/web01-sda.img"
ls -ls "$WORK/web01-sda.img"

step "drctl enroll agent: an identity for VM web01"
"$B/drctl" enroll agent --vm web01 --out "$WORK/web01.bundle"

step "mobility-agent run: protect web01"
"$B/mobility-agent" run --server "$TERN_SERVER" --identity "$WORK/web01.bundle" --vm web01 \
  --disk "sda=$WORK/web01-sda.img" --state-dir "$WORK/agent-state" --interval 30s 2>"$WORK/agent.log" &
AGENT_PID=$!
for _ in $(seq 100); do
  "$B/drctl" status web01 --json 2>/dev/null | grep -q '"agent_connected": true' && break; sleep 0.1
done

step "drctl checkpoint --wait: the first recovery point (initial sync)"
"$B/drctl" checkpoint web01 --wait
cp --sparse=always "$WORK/web01-sda.img" "$WORK/source-at-point1.img"
P1=$("$B/drctl" points web01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')

step "the VM writes: 1% of the disk's 4 KiB pages rewritten at random"
echo "rewrote $(scatter "$WORK/web01-sda.img" 1 1) bytes"

step "drctl checkpoint --wait: an incremental point"
"$B/drctl" checkpoint web01 --wait
P2=$("$B/drctl" points web01 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[-1]["id"])')

step "drctl status and drctl points"
"$B/drctl" status
"$B/drctl" points web01

verify() { # point reference format
  local out="$WORK/test-failover-$1-$3"
  step "drctl test-failover web01 --point $1 --format $3"
  "$B/drctl" test-failover web01 --point "$1" --output "$out" --format "$3"
  local fmt=raw; [ "$3" = vhd ] && fmt=vpc
  qemu-img compare -q -f raw -F "$fmt" "$2" "$out/sda.$3"
  echo "qemu-img compare: the $3 output of point $1 is identical to the source at that point"
  [ "$3" = vhd ] && qemu-img info -f vpc "$out/sda.vhd" | head -3
  "$B/drctl" test-failover-cleanup web01
}
verify "$P1" "$WORK/source-at-point1.img" raw
verify "$P1" "$WORK/source-at-point1.img" vhd
verify "$P2" "$WORK/web01-sda.img" raw
verify "$P2" "$WORK/web01-sda.img" vhd

step "unplanned failover: the primary site is lost (the agent stops)"
kill "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
"$B/drctl" failover web01 --kind unplanned --output "$WORK/recovered"
same "$WORK/web01-sda.img" "$WORK/recovered/sda.raw" "the recovered disk is the source at the last point"
"$B/drctl" commit web01

step "the recovered VM runs at the recovery site and writes"
echo "rewrote $(scatter "$WORK/recovered/sda.raw" 2 2) bytes"

step "a master target on the primary site; reprotect to the original disk (delta sync)"
"$B/drctl" enroll master-target --name onprem1 --out "$WORK/onprem1.bundle"
"$B/master-target" serve --data-dir "$WORK/mt" --listen 127.0.0.1:0 --identity "$WORK/onprem1.bundle" \
  >"$WORK/mt.out" 2>"$WORK/mt.log" &
MT_PID=$!
for _ in $(seq 100); do grep -q listening "$WORK/mt.out" 2>/dev/null && break; sleep 0.1; done
MT_URL="https://$(sed -n 's/^listening on //p' "$WORK/mt.out")"
"$B/drctl" reprotect web01 --master-target "$MT_URL" --location original \
  --target-disk "sda=$WORK/web01-sda.img" --identity-out "$WORK/web01-back.bundle"
"$B/mobility-agent" run --server "$TERN_SERVER" --identity "$WORK/web01-back.bundle" --vm web01 \
  --disk "sda=$WORK/recovered/sda.raw" --state-dir "$WORK/agent-back" --shutdown true 2>"$WORK/agent-back.log" &
REC_PID=$!
wait_connected
"$B/drctl" checkpoint web01 --wait
"$B/drctl" status web01

step "failback: shut the recovered VM down, drain, apply onto the on-premises disk, verify"
cp --sparse=always "$WORK/recovered/sda.raw" "$WORK/recovered-final.raw"
"$B/drctl" failback web01
same "$WORK/recovered-final.raw" "$WORK/web01-sda.img" "the on-premises disk equals the recovered VM's final state"
"$B/drctl" commit web01

step "reverse replication: the primary site protects the VM again (delta sync)"
"$B/drctl" reverse-replicate web01
"$B/mobility-agent" run --server "$TERN_SERVER" --identity "$WORK/web01.bundle" --vm web01 \
  --disk "sda=$WORK/web01-sda.img" --state-dir "$WORK/agent-state-2" 2>"$WORK/agent-2.log" &
AGENT_PID=$!
wait_connected
"$B/drctl" checkpoint web01 --wait
"$B/drctl" status web01
verify latest-processed "$WORK/web01-sda.img" raw

step "done: the circle is closed, every disk verified byte for byte"
