#!/usr/bin/env bash
# Benchmark: a process-server restart with records past the agent's saved state. An agent in
# --mode nbd takes RATE (default 80m) of random 4 KiB writes for SECS (default 20) with no
# point in between (the crash interval is 5 min), so about 400,000 records follow its last
# point. Then both are killed -9; the process server is started again, then the agent, and
# the bench prints how long from the agent's start until its new session is admitted: the
# server tells the agent which blocks those records wrote, from the `.ranges` files beside
# the closed segments, reading headers only where there is none (docs/on-disk-format.md).
# The same again with the `.ranges` files deleted shows what reading every header costs.
# Needs: fio (with the nbd engine), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-80m}
SECS=${SECS:-20}
. bench/lib.sh
need_tools fio python3
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-restart.XXXXXX)
cleanup() { kill "${AGENT:-}" "${SERVER:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

head -c 256M /dev/urandom >"$W/disk.img"
truncate -s 1G "$W/disk.img"
"$B/process-server" init --data-dir "$W/ps" >/dev/null
serve() {
  "$B/process-server" serve --data-dir "$W/ps" --listen "127.0.0.1:${PORT:-0}" >"$W/ps.out" 2>>"$W/ps.log" &
  SERVER=$!
}
serve
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
ADDR=$(sed -n 's/^listening on //p' "$W/ps.out")
PORT=${ADDR##*:}
export TERN_SERVER="https://$ADDR" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"
"$B/drctl" enroll agent --vm db --out "$W/db.bundle" >/dev/null
"$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/db.bundle" --vm db --disk "sda=$W/disk.img" \
  --state-dir "$W/st" --mode nbd --nbd-listen "unix:$W/tern.sock" 2>"$W/agent.log" &
AGENT=$!
until "$B/drctl" status db --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.05; done
fio --name=b --ioengine=nbd --uri="nbd+unix:///sda?socket=$W/tern.sock" --rw=randwrite --bs=4k --iodepth=16 \
  --size=1G --time_based --runtime="$SECS" --rate="$RATE" >/dev/null 2>&1
until "$B/drctl" status db --json | python3 -c 'import json,sys; d=json.load(sys.stdin)["disks"][0]; sys.exit(d["backlog_bytes"] > 0)'; do sleep 0.2; done
JOURNAL=$(du -sm "$W/ps/vms" | cut -f1)
SEGS=$(find "$W/ps/vms" -name '*.seg' | wc -l)
echo "journal ${JOURNAL} MiB in $SEGS segments; change log dropped $(grep -c 'dropping it' "$W/agent.log" || true) times"

# Both stopped (kill -9), the agent's state at its last point. Each round starts the process
# server, waits for it to listen, starts the agent and times its session's admission (the
# agent is stopped again before its compare of those blocks can end in a point).
kill -9 "$AGENT" "$SERVER"
wait 2>/dev/null || true
round() {
  local n t0
  [ "$1" = keep ] || find "$W/ps/vms" -name '*.ranges' -delete
  : >"$W/ps.out"
  serve
  for _ in $(seq 200); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
  n=$(grep -c "agent connected" "$W/ps.log" || true)
  t0=$(now)
  "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/db.bundle" --vm db --disk "sda=$W/disk.img" \
    --state-dir "$W/st" --mode nbd --nbd-listen "unix:$W/tern.sock" 2>>"$W/agent.log" &
  AGENT=$!
  until [ "$(grep -c "agent connected" "$W/ps.log")" -gt "$n" ]; do sleep 0.02; done
  WAIT=$(calc "$(now)-$t0")
  kill -9 "$AGENT" "$SERVER"
  wait 2>/dev/null || true
  echo "$1 .ranges files: session admitted ${WAIT} s after the agent started;" \
    "$(sed 's/\x1b\[[0-9;]*m//g' "$W/ps.log" | grep "records past the agent's saved state" | tail -1 | grep -o 'agent_seq=.*')"
}
# Kept first: the headers the second round reads are then still out of the page cache (the
# journal drops its pages once synced), as after a real restart.
round keep
WITH=$WAIT
round drop
WITHOUT=$WAIT
echo
echo "| figure | seconds |"
echo "|---|---|"
echo "| agent start to its session admitted, the .ranges files kept | $WITH |"
echo "| the same, the .ranges files deleted (every header read) | $WITHOUT |"
