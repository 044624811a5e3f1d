#!/usr/bin/env bash
# Benchmark: replication over a WAN. bench/delay_proxy.py delays every chunk by RTT/2 in each
# direction (a delay line; optional RATE cap in MB/s) in front of the process server (agent
# -> PS) and of the master target (PS -> MT). For each round trip in RTTS (default 0 20 50 ms):
#   initial sync   SIZE_MIB (default 512) MiB of random data, agent -> proxy -> PS
#   plain TCP      the same bytes through the same proxy (python socket send -> recv)
#   delta sync     reprotect to the original disk after 1 % of its pages changed at the
#                  recovery site, until the master target holds the first point
#   full download  reprotect to a new disk with --sync during, then fail back
# Prints seconds and MB/s of each, CPU seconds and peak RSS of agent and process server,
# then each round trip's figures against the 0 ms ones and plain TCP (issue 16's targets).
# Needs: python3.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
need_tools python3
SIZE_MIB=${SIZE_MIB:-512}
RTTS=${RTTS:-"0 20 50"}
export RATE=${RATE:-}
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-wan.XXXXXX)
cleanup() {
  pkill -f -- "$W/" 2>/dev/null || true
  [ -f "$W/proxies" ] && xargs kill <"$W/proxies" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
}
# done_with DIR: stops the daemons of DIR and removes it (each case holds several copies of
# the disk: with SIZE_MIB=2048 the cases of three round trips would need ~40 GB together).
done_with() {
  pkill -f -- "$1/" 2>/dev/null || true
  [ -f "$1/proxies" ] && xargs kill <"$1/proxies" 2>/dev/null || true
  for _ in $(seq 100); do pgrep -f -- "$1/" >/dev/null || break; sleep 0.1; done
  rm -rf "$1" || true
}
trap cleanup EXIT
BYTES=$((SIZE_MIB << 20))
python3 -c "import os,sys; f=open(sys.argv[1],'wb'); [f.write(os.urandom(1<<20)) for _ in range(int(sys.argv[2]))]" "$W/src.img" "$SIZE_MIB"

# proxy DIR TARGET_PORT RTT_MS: starts a delay proxy; prints its port.
proxy() {
  python3 bench/delay_proxy.py 0 "$2" "$(calc "$3/2")" $RATE >"$1.out" 2>/dev/null &
  echo $! >>"$W/proxies"
  echo $! >>"$(dirname "$1")/proxies"
  for _ in $(seq 100); do grep -q listening "$1.out" 2>/dev/null && break; sleep 0.05; done
  sed -n 's/^listening on //p' "$1.out"
}

listening() { for _ in $(seq 200); do grep -q listening "$1" 2>/dev/null && break; sleep 0.05; done; sed -n 's/^listening on //p' "$1"; }
field() { "$B/drctl" status vm --json | python3 -c "import json,sys; v=json.load(sys.stdin)['$1']; print(v if v is not None else '')"; }

# plain_tcp RTT: seconds to push BYTES through a delay proxy to a sink.
plain_tcp() {
  python3 - "$1" "$BYTES" "$PWD/bench/delay_proxy.py" "$W" <<'PY'
import os, socket, subprocess, sys, threading, time
rtt, total, proxy, w = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
sink = socket.socket(); sink.bind(("127.0.0.1", 0)); sink.listen(1)
p = subprocess.Popen([sys.executable, proxy, "0", str(sink.getsockname()[1]), str(rtt / 2), *os.environ.get("RATE", "").split()],
                     stdout=subprocess.PIPE, text=True, cwd=w)
port = int(p.stdout.readline().split()[-1])
got = [0]
def drain():
    c, _ = sink.accept()
    while (n := len(c.recv(1 << 20))):
        got[0] += n
t = threading.Thread(target=drain); t.start()
s = socket.create_connection(("127.0.0.1", port))
buf = os.urandom(1 << 20)
t0 = time.time()
for _ in range(total >> 20):
    s.sendall(buf)
s.shutdown(socket.SHUT_WR)
t.join()
print(f"{time.time() - t0:.2f}")
p.kill()
PY
}

run_rtt() {
  local rtt=$1 d="$W/rtt$1"
  mkdir -p "$d"
  "$B/process-server" init --data-dir "$d/ps" >/dev/null
  "$B/process-server" serve --data-dir "$d/ps" --listen 127.0.0.1:0 >"$d/ps.out" 2>"$d/ps.log" &
  local ps=$!
  local psport; psport=$(listening "$d/ps.out" | sed 's/.*://')
  export TERN_SERVER="https://127.0.0.1:$psport" TERN_ADMIN_IDENTITY="$d/ps/pki/admin.bundle"
  local wan; wan=$(proxy "$d/p1" "$psport" "$rtt")
  "$B/drctl" enroll agent --vm vm --out "$d/agent.bundle" >/dev/null
  "$B/drctl" enroll master-target --name mt --out "$d/mt.bundle" >/dev/null
  cp "$W/src.img" "$d/onprem.img"
  local t0 t1 c0; t0=$(now); c0=$(cpu $ps)
  "$B/mobility-agent" run --server "https://127.0.0.1:$wan" --identity "$d/agent.bundle" --vm vm \
    --disk "sda=$d/onprem.img" --state-dir "$d/st1" --interval 1h 2>"$d/a1.log" &
  local a1=$!
  until [ -n "$(field last_point 2>/dev/null)" ]; do sleep 0.05; done
  t1=$(now)
  local init; init=$(calc "$t1-$t0")
  local arss acpu pscpu; arss=$(hwm $a1); acpu=$(cpu $a1); pscpu=$(calc "$(cpu $ps)-$c0")
  kill -9 $a1; wait $a1 2>/dev/null || true
  "$B/drctl" failover vm --kind unplanned --output "$d/out" >/dev/null
  "$B/drctl" commit vm >/dev/null
  scatter "$d/out/sda.raw" 1 7 >/dev/null
  "$B/master-target" serve --data-dir "$d/mt" --listen 127.0.0.1:0 --identity "$d/mt.bundle" >"$d/mt.out" 2>"$d/mt.log" &
  local mtport; mtport=$(listening "$d/mt.out" | sed 's/.*://')
  local mtwan; mtwan=$(proxy "$d/p2" "$mtport" "$rtt")
  # Delta sync: reprotect to the original disk, until the master target holds the first point.
  "$B/drctl" reprotect vm --master-target "https://127.0.0.1:$mtwan" --location original --sync before \
    --target-disk "sda=$d/onprem.img" --identity-out "$d/rec.bundle" >/dev/null
  t0=$(now)
  "$B/mobility-agent" run --server "https://127.0.0.1:$wan" --identity "$d/rec.bundle" --vm vm \
    --disk "sda=$d/out/sda.raw" --state-dir "$d/st2" --shutdown true 2>"$d/a2.log" &
  local a2=$!
  python3 - "$B/drctl" "$d" <<'PY'
import json, subprocess, sys, time
deadline = time.time() + 900
while time.time() < deadline:
    r = subprocess.run([sys.argv[1], "status", "vm", "--json"], capture_output=True, text=True)
    if r.returncode == 0:
        s = json.loads(r.stdout)
        if s["last_point"] is not None and s["state"] == "reprotected" and all(d["master_target_seq"] >= d["durable_seq"] > 0 for d in s["disks"]):
            break
    time.sleep(0.02)
else:
    sys.exit("the delta sync did not finish")
PY
  t1=$(now)
  local delta; delta=$(calc "$t1-$t0")
  local a2rss; a2rss=$(hwm $a2)
  "$B/drctl" failback vm >/dev/null
  cmp -s "$d/out/sda.raw" "$d/onprem.img" || { echo "MISMATCH after the delta sync's failback" >&2; exit 1; }
  local psrss; psrss=$(hwm $ps)
  done_with "$d"
  echo "$init $delta $arss $psrss $acpu $pscpu $a2rss"
}

# full_download RTT: a fresh VM protected from the source, failed over, reprotected to a new
# disk with --sync during and failed back: the failback's time.
full_download() {
  local rtt=$1 d="$W/full$1"
  mkdir -p "$d"
  "$B/process-server" init --data-dir "$d/ps" >/dev/null
  "$B/process-server" serve --data-dir "$d/ps" --listen 127.0.0.1:0 >"$d/ps.out" 2>"$d/ps.log" &
  local psport; psport=$(listening "$d/ps.out" | sed 's/.*://')
  export TERN_SERVER="https://127.0.0.1:$psport" TERN_ADMIN_IDENTITY="$d/ps/pki/admin.bundle"
  local wan; wan=$(proxy "$d/p1" "$psport" "$rtt")
  "$B/drctl" enroll agent --vm vm --out "$d/agent.bundle" >/dev/null
  "$B/drctl" enroll master-target --name mt --out "$d/mt.bundle" >/dev/null
  "$B/mobility-agent" run --server "https://127.0.0.1:$psport" --identity "$d/agent.bundle" --vm vm \
    --disk "sda=$W/src.img" --state-dir "$d/st1" --interval 1h 2>"$d/a1.log" &
  local a1=$!
  until [ -n "$(field last_point 2>/dev/null)" ]; do sleep 0.05; done
  kill -9 $a1; wait $a1 2>/dev/null || true
  "$B/drctl" failover vm --kind unplanned --output "$d/out" >/dev/null
  "$B/drctl" commit vm >/dev/null
  "$B/master-target" serve --data-dir "$d/mt" --listen 127.0.0.1:0 --identity "$d/mt.bundle" >"$d/mt.out" 2>"$d/mt.log" &
  local mtport; mtport=$(listening "$d/mt.out" | sed 's/.*://')
  local mtwan; mtwan=$(proxy "$d/p2" "$mtport" "$rtt")
  "$B/drctl" reprotect vm --master-target "https://127.0.0.1:$mtwan" --location alternate --sync during \
    --target-disk "sda=$d/new.img" --identity-out "$d/rec.bundle" >/dev/null
  "$B/mobility-agent" run --server "https://127.0.0.1:$wan" --identity "$d/rec.bundle" --vm vm \
    --disk "sda=$d/out/sda.raw" --state-dir "$d/st2" --shutdown true 2>"$d/a2.log" &
  until "$B/drctl" status vm --json | grep -q '"agent_connected": true'; do sleep 0.02; done
  local t0 t1; t0=$(now)
  "$B/drctl" failback vm >/dev/null
  t1=$(now)
  cmp -s "$d/out/sda.raw" "$d/new.img" || { echo "MISMATCH after the full download" >&2; exit 1; }
  done_with "$d"
  calc "$t1-$t0"
}

printf '%-6s %-28s %10s %10s\n' "RTT" "what" "seconds" "MB/s"
declare -A INIT DELTA FULL TCP
for rtt in $RTTS; do
  read -r init delta arss psrss acpu pscpu a2rss < <(run_rtt "$rtt")
  tcp=$(plain_tcp "$rtt")
  full=$(full_download "$rtt")
  mb() { calc "$BYTES/$1/1e6"; }
  printf '%-6s %-28s %10s %10s\n' "${rtt}ms" "initial sync" "$init" "$(mb "$init")"
  printf '%-6s %-28s %10s %10s\n' "${rtt}ms" "plain TCP, same proxy" "$tcp" "$(mb "$tcp")"
  printf '%-6s %-28s %10s\n' "${rtt}ms" "1 % delta sync (reprotect)" "$delta"
  printf '%-6s %-28s %10s %10s\n' "${rtt}ms" "full download (failback)" "$full" "$(mb "$full")"
  printf '%-6s %-28s %10s\n' "${rtt}ms" "initial sync CPU agent / PS" "$acpu / $pscpu s"
  printf '%-6s %-28s %10s\n' "${rtt}ms" "peak RSS agent / PS (MiB)" "$arss / $psrss"
  printf '%-6s %-28s %10s\n' "${rtt}ms" "peak RSS, delta sync agent" "$a2rss MiB"
  INIT[$rtt]=$init DELTA[$rtt]=$delta FULL[$rtt]=$full TCP[$rtt]=$tcp
done
first=${RTTS%% *}
echo "== against ${first} ms and plain TCP through the same proxy (issue 16's targets)"
for rtt in $RTTS; do
  [ "$rtt" = "$first" ] && continue
  printf '%-6s %-44s %6s  %s\n' "${rtt}ms" "initial sync rate / its rate at ${first} ms" "$(calc "${INIT[$first]}/${INIT[$rtt]}")" "(>= 0.80)"
  printf '%-6s %-44s %6s  %s\n' "${rtt}ms" "initial sync rate / plain TCP's" "$(calc "${TCP[$rtt]}/${INIT[$rtt]}")" "(>= 0.50)"
  printf '%-6s %-44s %6s  %s\n' "${rtt}ms" "1 % delta sync time / its time at ${first} ms" "$(calc "${DELTA[$rtt]}/${DELTA[$first]}")" "(<= 1.50)"
  printf '%-6s %-44s %6s  %s\n' "${rtt}ms" "full download time / its time at ${first} ms" "$(calc "${FULL[$rtt]}/${FULL[$first]}")" "(<= 1.50)"
done
