#!/usr/bin/env bash
# Benchmark: the io path of `--mode nbd` (issue 11). One image of IMAGE_MIB (default 1024),
# served in turn by qemu-nbd --cache=writeback (the peer) and by tern's agent, each
# driven by fio's nbd engine: 4 KiB random writes at iodepth 16, then 1 MiB sequential
# writes, RUNTIME seconds each (default 20). Then, with a 1 s crash interval, fio writes
# RATE (default 50m) of random 4 KiB writes for RPO_SECS (default 60) while the point lag
# (now minus the newest point's time) is sampled every second.
# Prints throughput (tern / qemu-nbd), the lag's p50/p99/max, the agent's peak RSS and its
# CPU-seconds per GB written. STEADY_ONLY=1 runs the RPO part alone, on a fresh agent (its
# peak RSS then owes nothing to the bursts of the throughput runs).
# Needs: fio (with the nbd engine), qemu-nbd, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE_MIB=${IMAGE_MIB:-1024}
RUNTIME=${RUNTIME:-20}
RPO_SECS=${RPO_SECS:-60}
RATE=${RATE:-50m}
STEADY_ONLY=${STEADY_ONLY:-}
. bench/lib.sh
need_tools fio qemu-nbd python3
cargo build --quiet --release --workspace --bins --locked
B="$PWD/target/release"
W=$(mktemp -d /tmp/tern-nbd.XXXXXX)
cleanup() { kill "${AGENT:-}" "${SERVER:-}" "${QNBD:-}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$W"; }
trap cleanup EXIT

head -c $((IMAGE_MIB / 4))M /dev/urandom >"$W/disk.img"
truncate -s "${IMAGE_MIB}M" "$W/disk.img"

# fio_run URI RW BS [extra fio options...]: prints "IOPS MB/s".
fio_run() {
  local uri=$1 rw=$2 bs=$3
  shift 3
  fio --name=b --ioengine=nbd --uri="$uri" --rw="$rw" --bs="$bs" --iodepth=16 --size="${IMAGE_MIB}M" \
    --time_based --runtime="$RUNTIME" --output-format=json "$@" 2>/dev/null | sed -n '/^{/,$p' |
    python3 -c 'import json,sys; w=json.load(sys.stdin)["jobs"][0]["write"]; print("%.0f %.1f" % (w["iops"], w["bw_bytes"] / 1e6))'
}

if [ -z "$STEADY_ONLY" ]; then
echo "== qemu-nbd --cache=writeback serving the image"
qemu-nbd --cache=writeback --persistent -f raw -x sda -k "$W/qnbd.sock" "$W/disk.img" &
QNBD=$!
for _ in $(seq 100); do [ -S "$W/qnbd.sock" ] && break; sleep 0.05; done
Q_RAND=$(fio_run "nbd+unix:///sda?socket=$W/qnbd.sock" randwrite 4k)
Q_SEQ=$(fio_run "nbd+unix:///sda?socket=$W/qnbd.sock" write 1M)
kill $QNBD; wait $QNBD 2>/dev/null || true; QNBD=
echo "random 4 KiB: ${Q_RAND% *} IOPS; sequential 1 MiB: ${Q_SEQ#* } MB/s"
fi

echo "== tern: process server and agent --mode nbd on the same image"
"$B/process-server" init --data-dir "$W/ps" >/dev/null
"$B/process-server" serve --data-dir "$W/ps" --listen 127.0.0.1:0 >"$W/ps.out" 2>"$W/ps.log" &
SERVER=$!
for _ in $(seq 100); do grep -q listening "$W/ps.out" 2>/dev/null && break; sleep 0.05; done
export TERN_SERVER="https://$(sed -n 's/^listening on //p' "$W/ps.out")" TERN_ADMIN_IDENTITY="$W/ps/pki/admin.bundle"
"$B/drctl" enroll agent --vm db --out "$W/db.bundle" >/dev/null
env ${AGENT_ENV:-} "$B/mobility-agent" run --server "$TERN_SERVER" --identity "$W/db.bundle" --vm db --disk "sda=$W/disk.img" \
  --state-dir "$W/st" --mode nbd --nbd-listen "unix:$W/tern.sock" 2>"$W/agent.log" &
AGENT=$!
until "$B/drctl" status db --json 2>/dev/null | grep -q '"last_point": [0-9]'; do sleep 0.05; done
URI="nbd+unix:///sda?socket=$W/tern.sock"
if [ -z "$STEADY_ONLY" ]; then
c0=$(cpu $AGENT)
T_RAND=$(fio_run "$URI" randwrite 4k)
T_SEQ=$(fio_run "$URI" write 1M)
c1=$(cpu $AGENT)
WRITTEN_GB=$(python3 -c "print(($RUNTIME * ${T_RAND% *} * 4096 + $RUNTIME * ${T_SEQ#* } * 1e6) / 1e9)")
echo "random 4 KiB: ${T_RAND% *} IOPS; sequential 1 MiB: ${T_SEQ#* } MB/s; agent CPU $(calc "$c1-$c0") s for $(calc "$WRITTEN_GB") GB"
DROPPED=$(grep -c "dropping it" "$W/agent.log" || true)
t0=$(now)
# The log may have been dropped (the agent then reconnects and compares the hot extents).
until "$B/drctl" checkpoint db --wait --timeout 10m >/dev/null 2>&1; do sleep 0.5; done
echo "caught up (a point after the writes) $(calc "$(now)-$t0") s after they stopped"
# Each drop ends the session; the next is admitted once the process server knows which
# blocks the records past the agent's saved state wrote. The longest wait, from the
# process server's log:
REGAP=$(python3 - "$W/ps.log" <<'PY'
import re, sys
from datetime import datetime
def t(line):
    return datetime.strptime(line[:26], "%Y-%m-%dT%H:%M:%S.%f").timestamp()
ended, gaps = None, []
for line in open(sys.argv[1]):
    line = re.sub(r"\x1b\[[0-9;]*m", "", line)
    if "agent session ended" in line:
        ended = t(line)
    elif "agent connected" in line and ended is not None:
        gaps.append(t(line) - ended)
        ended = None
print(f"{max(gaps):.2f}" if gaps else "-")
PY
)
echo "longest wait for a new session after the log was dropped: ${REGAP} s"
fi

echo "== RPO: a 1 s crash interval, fio writing $RATE/s of random 4 KiB for ${RPO_SECS}s"
"$B/drctl" policy set db --crash-interval 1s >/dev/null
sleep 2
# The peak RSS of the steady run alone (5: reset the peak, Linux 4.0 on); what the burst
# before left in the heap stays counted.
RSS_BURST=$(hwm $AGENT)
echo 5 >"/proc/$AGENT/clear_refs" 2>/dev/null || true
fio --name=r --ioengine=nbd --uri="$URI" --rw=randwrite --bs=4k --iodepth=16 --size="${IMAGE_MIB}M" \
  --time_based --runtime="$RPO_SECS" --rate="$RATE" >/dev/null 2>&1 &
FIO=$!
c0=$(cpu $AGENT)
python3 - "$B/drctl" "$RPO_SECS" >"$W/lags" <<'PY'
import datetime, json, subprocess, sys, time
drctl, secs = sys.argv[1], int(sys.argv[2])
end = time.time() + secs
while time.time() < end:
    time.sleep(1)
    pts = json.loads(subprocess.run([drctl, "points", "db", "--json"], capture_output=True, check=True).stdout)
    t = datetime.datetime.fromisoformat(pts[-1]["time"].replace("Z", "+00:00")).timestamp()
    print(f"{time.time() - t:.3f}")
PY
wait $FIO || true
c1=$(cpu $AGENT)
RPO=$(python3 -c "
import sys
v = sorted(float(x) for x in open('$W/lags'))
q = lambda p: v[min(len(v) - 1, int(p * len(v)))]
print(f'{q(0.5):.2f} {q(0.99):.2f} {v[-1]:.2f} {len(v)}')")
read -r P50 P99 PMAX N <<<"$RPO"
RSS_STEADY=$(hwm $AGENT)
RSS=$(python3 -c "print(max($RSS_BURST, $RSS_STEADY))")
RATE_GB=$(python3 -c "r='$RATE'; m={'k':1e3,'m':1e6,'g':1e9}; print(float(r[:-1]) * m[r[-1].lower()] * $RPO_SECS / 1e9)")
echo "point lag over $N samples: p50 ${P50}s p99 ${P99}s max ${PMAX}s; agent CPU $(calc "$c1-$c0") s for $(calc "$RATE_GB") GB"

echo
echo "| figure | tern | qemu-nbd | ratio | target |"
echo "|---|---|---|---|---|"
if [ -z "$STEADY_ONLY" ]; then
echo "| random 4 KiB writes, iodepth 16 (IOPS) | ${T_RAND% *} | ${Q_RAND% *} | $(calc "${T_RAND% *}/${Q_RAND% *}") | >= 0.8 |"
echo "| sequential 1 MiB writes (MB/s) | ${T_SEQ#* } | ${Q_SEQ#* } | $(calc "${T_SEQ#* }/${Q_SEQ#* }") | >= 0.8 |"
fi
echo "| point lag p99 at $RATE/s, 1 s interval (s) | $P99 | | | <= 2 |"
echo "| agent peak RSS (MiB; log buffer 64 MiB) | $RSS | | | <= 64 + buffers |"
echo "| agent peak RSS in the RPO run alone (MiB) | $RSS_STEADY | | | <= 64 + buffers |"
echo "| agent CPU-s per GB written (RPO run) | $(calc "($c1-$c0)/$RATE_GB") | | | |"
[ -n "$STEADY_ONLY" ] || echo "| change log dropped during the throughput runs | $DROPPED times | | | |"
[ -n "$STEADY_ONLY" ] || echo "| longest wait for a new session after a drop (s) | $REGAP | | | |"
