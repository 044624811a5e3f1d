#!/usr/bin/env bash
# Benchmark: what multi-VM points cost (issue 13). Two VMs, a and b, in nbd mode in one
# replication group, each an image of IMAGE_MIB (default 256) served by its agent; fio
# (nbd engine) writes random 4 KiB at iodepth 16 to both at once, RATE each (default 10m:
# what both agents and the process server replicate on this 2-core machine without the
# log overflowing; uncapped, the writes outrun replication and the logs are dropped), for
# RUNTIME seconds (default 20): first with no multi-VM point (the peer: the same VMs
# unbarriered), then while multi-VM points are taken one after another (`drctl group
# checkpoint`, back to back). Prints both runs' write IOPS and completion latency
# (p50/p99/max), how many multi-VM points were made, how long the members held their
# writes for each (from the points' notes) and how long each `group checkpoint` took end
# to end, with the agents' CPU and peak RSS.
# Needs: fio (with the nbd engine), python3.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_MIB=${IMAGE_MIB:-256}
RATE=${RATE:-10m}
RUNTIME=${RUNTIME:-20}
# KEEP=1 keeps the work directory (logs) for a look afterwards.
. bench/lib.sh
need_tools fio python3
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-groups.XXXXXX)
cleanup() { kill "${AGENT_A:-}" "${AGENT_B:-}" "${SERVER:-}" 2>/dev/null || true; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"; }
trap cleanup EXIT

"$B/process-server" init --data-dir "$W/ps" >/dev/null
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps.out" 2>"$W/ps.log" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps.out")" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"
for vm in a b; do
  head -c $((IMAGE_MIB / 4))M /dev/urandom >"$W/$vm.img"
  truncate -s "${IMAGE_MIB}M" "$W/$vm.img"
  "$B/drctl" enroll agent --vm $vm --out "$W/$vm.bundle" >/dev/null
  "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/$vm.bundle" --vm $vm --disk "sda=$W/$vm.img" \
    --state-dir "$W/st-$vm" --mode nbd --nbd-listen "unix:$W/$vm.sock" 2>"$W/agent-$vm.log" &
  eval "AGENT_${vm^^}=$!"
done
for vm in a b; do
  until "$B/drctl" status $vm --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.1; done
done
"$B/drctl" group create shop --vm a --vm b >/dev/null

# fio_both OUT: random 4 KiB writes to both exports for RUNTIME s; writes the summed IOPS to OUT.
fio_both() {
  local pids=()
  for vm in a b; do
    fio --name=$vm --ioengine=nbd --uri="nbd+unix:///sda?socket=$W/$vm.sock" --rw=randwrite --bs=4k --iodepth=16 \
      --size="${IMAGE_MIB}M" --rate="$RATE" --time_based --runtime="$RUNTIME" --output-format=json 2>/dev/null \
      >"$W/fio-$vm.json" &
    pids+=($!)
  done
  wait "${pids[@]}"
  python3 - "$W/fio-a.json" "$W/fio-b.json" >"$1" <<'PY'
import json, sys
total, p50, p99, top = 0, 0, 0, 0
for path in sys.argv[1:]:
    text = open(path).read()
    w = json.loads(text[text.index("{"):])["jobs"][0]["write"]
    total += w["iops"]
    pct = w["clat_ns"]["percentile"]
    p50, p99 = max(p50, pct["50.000000"]), max(p99, pct["99.000000"])
    top = max(top, w["clat_ns"]["max"])
print(f"{total:.0f} IOPS, write latency p50 {p50 / 1e6:.2f} ms, p99 {p99 / 1e6:.2f} ms, max {top / 1e6:.1f} ms")
PY
}

echo "== both VMs written, no multi-VM point (the peer)"
fio_both "$W/iops-plain"
echo "random 4 KiB, both VMs: $(cat "$W/iops-plain")"
until "$B/drctl" checkpoint a --wait --timeout 10m >/dev/null 2>&1; do sleep 0.5; done
until "$B/drctl" checkpoint b --wait --timeout 10m >/dev/null 2>&1; do sleep 0.5; done

echo "== both VMs written while multi-VM points are taken back to back"
ca0=$(cpu $AGENT_A) cb0=$(cpu $AGENT_B)
fio_both "$W/iops-barriers" &
FIO=$!
sleep 1
: >"$W/latency"
while kill -0 $FIO 2>/dev/null; do
  t0=$(now)
  if "$B/drctl" group checkpoint shop --json >"$W/last.json" 2>>"$W/refused"; then
    echo "$(calc "($(now)-$t0)*1000")" >>"$W/latency"
  fi
done
wait $FIO
ca1=$(cpu $AGENT_A) cb1=$(cpu $AGENT_B)
echo "random 4 KiB, both VMs: $(cat "$W/iops-barriers")"
sort "$W/refused" | uniq -c | sort -rn | head -3

"$B/drctl" points a --json >"$W/points.json"
python3 - "$W/points.json" "$W/latency" "$W/iops-plain" "$W/iops-barriers" "$W/refused" <<'PY'
import json, re, sys
points = [p for p in json.load(open(sys.argv[1])) if p.get("group") == "shop"]
held = sorted(int(m.group(1)) for p in points if (m := re.search(r"writes held (\d+) ms", p.get("note", ""))))
lat = sorted(float(l) for l in open(sys.argv[2]) if l.strip())
plain, barriers = (float(open(f).read().split()[0]) for f in sys.argv[3:5])
refused = [l for l in open(sys.argv[5]) if l.strip()]
def q(xs, f):
    return xs[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan")
print(f"multi-VM points made: {len(points)} ({len(refused)} refused)")
print(f"writes held per point (a): p50 {q(held, .5)} ms, p99 {q(held, .99)} ms, max {held[-1] if held else 'n/a'} ms")
print(f"group checkpoint end to end: p50 {q(lat, .5):.0f} ms, p99 {q(lat, .99):.0f} ms")
print(f"write IOPS while barriers run / without: {barriers:.0f} / {plain:.0f} = {barriers / plain:.2f}")
PY
echo "agents' CPU during the barrier run: a $(calc "$ca1-$ca0") s, b $(calc "$cb1-$cb0") s; peak RSS a $(hwm $AGENT_A) MiB, b $(hwm $AGENT_B) MiB"
