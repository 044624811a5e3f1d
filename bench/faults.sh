#!/usr/bin/env bash
# The long fault loop: the e2e fault loop (tests/tests/e2e/faults.rs, fault_loop) run for
# ITERATIONS (default 100) against release binaries. Each iteration: a writer changes pages
# (sometimes back to earlier values), a pass starts, and at a random moment of it the agent
# is killed -9, the process server is killed -9, or the connection drops, for one second;
# then every listed point is verified and the newest point's test failover must equal the
# source. Prints each iteration's reconnect time after the 1 s outage and a summary, and
# fails if any reconnect took more than 3 s. SEED=N repeats a run.
# Needs: mkfs.ext4, qemu-img (as the e2e suite).
set -euo pipefail
cd "$(dirname "$0")/.."
ITERATIONS=${ITERATIONS:-100}
SEED=${SEED:-$(date +%s)}
cargo build --quiet --release --workspace --bins --locked
LOG=$(mktemp /tmp/tern-faults.XXXXXX)
echo "== fault loop: $ITERATIONS iterations, seed $SEED, release binaries"
t0=$(date +%s)
TERN_BIN_DIR="$PWD/target/release" TERN_FAULT_ITERATIONS=$ITERATIONS TERN_FAULT_SEED=$SEED \
  cargo nextest run --locked -p tern-e2e --no-capture \
  -E 'test(=faults::fault_loop)' 2>&1 | tee "$LOG" | grep --line-buffered -E '^fault loop' || true
t1=$(date +%s)
grep -q 'fault loop summary' "$LOG" || { echo "the loop failed (whole output in $LOG):"; grep -E -A12 'panicked|FAIL' "$LOG" | head -60; exit 1; }
python3 - "$LOG" <<'PY'
import re, sys
times = {}
for line in open(sys.argv[1]):
    m = re.match(r"fault loop: iteration \d+ (\w+)( mid-pass)?: reconnected in ([\d.]+)(ms|s)", line)
    if m:
        t = float(m.group(3)) / (1000 if m.group(4) == "ms" else 1)
        times.setdefault(m.group(1), []).append(t)
over = 0
for kind, ts in sorted(times.items()):
    ts.sort()
    over += sum(t > 3 for t in ts)
    print(f"reconnect after 1 s outage, {kind:10} n={len(ts):3}  median {ts[len(ts)//2]:.2f} s  max {ts[-1]:.2f} s")
print("every reconnect within 3 s: " + ("yes" if over == 0 else f"NO ({over} over)"))
sys.exit(1 if over else 0)
PY
rm -f "$LOG"
echo "wall time: $((t1 - t0)) s"
