#!/usr/bin/env bash
# Benchmark: an initial sync over a link that keeps dropping. bench/delay_proxy.py stands in
# front of the process server with a rate cap of RATE MB/s (default 100), a round trip of
# RTT_MS (default 0), and resets every connection CUT_S seconds (default 4) after it
# opened; the agent reconnects each time. SIZE_MIB (default 1024) MiB of random data, each
# run on a fresh process server:
#   tern, link whole, saving no progress mid-pass (--save-every 1h, as before the saves)
#   tern, link whole, saving progress from SAVE_EVERY in and every SAVE_EVERY after (default
#     2s, the agent's default; a save that waits for all in flight doubles it, up to 16x)
#   tern, link cut every CUT_S s, saving no progress mid-pass
#   tern, link cut every CUT_S s, saving progress as above
#   rsync --partial --append-verify over the same cutting proxy, run again until it
#     succeeds (the peer: a copy tool that resumes a cut transfer)
# Prints, per run: seconds until the first recovery point (or until the copy is whole),
# sessions (connections), bytes the agent wrote (wchar of /proc/PID/io: its TLS stream,
# what a cut threw away included — the proxy holds up to 128 MiB in flight — plus its state
# table and log), CPU seconds of agent and process server. A run not done within LIMIT_S
# (default 300) says so; WHOLE_ONLY=1 runs only the first two (the cost of the saves).
# Needs: python3, rsync, b3sum.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_tools python3 rsync b3sum
SIZE_MIB=${SIZE_MIB:-1024}
RATE=${RATE:-100}
CUT_S=${CUT_S:-4}
RTT_MS=${RTT_MS:-0}
SAVE_EVERY=${SAVE_EVERY:-2s}
LIMIT_S=${LIMIT_S:-300}
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-resets.XXXXXX)
cleanup() {
  pkill -f -- "$W/" 2>/dev/null || true
  kill "${PROXY:-}" "${RSYNCD:-}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
trap cleanup EXIT
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$W/disk.img"
WANT=$(b3sum --no-names "$W/disk.img")

# proxy TARGET_PORT CUT: starts the proxy (sets PROXY and PPORT).
proxy() {
  rm -f "$W/proxy.out"
  python3 bench/delay_proxy.py 0 "$1" "$(calc "$RTT_MS/2")" "$RATE" "$2" >"$W/proxy.out" &
  PROXY=$!
  until grep -q listening "$W/proxy.out" 2>/dev/null; do sleep 0.05; done
  PPORT=$(sed -n 's/^listening on //p' "$W/proxy.out")
}

# run NAME CUT SAVE_EVERY: one initial sync on a fresh process server; prints its line.
run() {
  local name=$1 cut=$2 save=$3 d="$W/$1"
  mkdir -p "$d"
  "$B/process-server" init --data-dir "$d/ps" >/dev/null
  "$B/process-server" serve --data-dir "$d/ps" --listen 127.0.0.1:0 >"$d/ps.out" 2>"$d/ps.log" &
  local server=$!
  until grep -q listening "$d/ps.out" 2>/dev/null; do sleep 0.05; done
  local url port
  url="https://$(sed -n 's/^listening on //p' "$d/ps.out")"
  port=${url##*:}
  export TERN_SERVER="$url" TERN_ADMIN_IDENTITY="$d/ps/pki/admin.bundle"
  "$B/drctl" enroll agent --vm r --out "$d/agent.bundle" >/dev/null
  proxy "$port" "$cut"
  local t0 t1 done=no
  t0=$(now)
  "$B/mobility-agent" run --server "https://127.0.0.1:$PPORT" --identity "$d/agent.bundle" --vm r \
    --disk "sda=$W/disk.img" --state-dir "$d/st" --interval 1h --save-every "$save" 2>"$d/agent.log" &
  local agent=$!
  while true; do
    if "$B/drctl" status r --json 2>/dev/null | grep -q '"last_point": [0-9]'; then done=yes; break; fi
    python3 -c "import sys,time; sys.exit(0 if time.time()-$t0 < $LIMIT_S else 1)" || break
    sleep 0.2
  done
  t1=$(now)
  local secs sessions wire a_cpu s_cpu
  wire=$(awk '/^wchar/ {print $2}' "/proc/$agent/io")
  secs=$(calc "$t1-$t0")
  sessions=$(grep -c 'connected; replicating' "$d/agent.log" || true)
  a_cpu=$(cpu $agent); s_cpu=$(cpu $server)
  if [ $done = yes ]; then
    "$B/drctl" test-failover r --output "$d/tfo" --json >"$d/tfo.json"
    local got
    got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["blake3"])' "$d/tfo.json")
    [ "$got" = "$WANT" ] || { echo "$name: the point does not equal the disk ($got vs $WANT)"; exit 1; }
  else
    secs="not done in ${LIMIT_S}"
  fi
  printf '%-44s %14s %9s %14s %10s %10s\n' "$name" "$secs" "$sessions" "$wire" "$a_cpu" "$s_cpu"
  kill "$agent" "$server" "$PROXY" 2>/dev/null || true
  wait "$agent" "$server" "$PROXY" 2>/dev/null || true
  rm -rf "$d"
}

echo "== ${SIZE_MIB} MiB of random data at ${RATE} MB/s, ${RTT_MS} ms round trip; the link reset every ${CUT_S} s where cut"
printf '%-44s %14s %9s %14s %10s %10s\n' "run" "first point s" "sessions" "agent wrote" "agent CPU" "server CPU"
run "tern, whole link, no mid-pass saves" 0 1h
run "tern, whole link, saves from $SAVE_EVERY" 0 "$SAVE_EVERY"
[ "${WHOLE_ONLY:-}" ] && exit 0
run "tern, cut every ${CUT_S} s, no mid-pass saves" "$CUT_S" 1h
run "tern, cut every ${CUT_S} s, saves from $SAVE_EVERY" "$CUT_S" "$SAVE_EVERY"

# The peer: rsync daemon behind the same cutting proxy, run again until it succeeds.
mkdir -p "$W/rsync-dst"
start_rsyncd "$W/rsync-dst"
proxy "$RPORT" "$CUT_S"
t0=$(now)
tries=0
until rsync --partial --append-verify --timeout=30 "$W/disk.img" "rsync://127.0.0.1:$PPORT/dst/disk.img" 2>/dev/null; do
  tries=$((tries + 1))
  python3 -c "import sys,time; sys.exit(0 if time.time()-$t0 < $LIMIT_S else 1)" || { tries="$tries, not done in ${LIMIT_S} s"; break; }
  sleep 0.2
done
t1=$(now)
GOT=$(b3sum --no-names "$W/rsync-dst/disk.img" 2>/dev/null || true)
[ "$GOT" = "$WANT" ] || echo "rsync: the copy does not equal the disk"
printf '%-44s %14s %9s\n' "rsync --partial --append-verify (peer)" "$(calc "$t1-$t0")" "$((${tries%%,*} + 1))"
