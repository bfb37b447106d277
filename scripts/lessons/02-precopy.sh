#!/usr/bin/env bash
# Lesson 2: pre-copy passes and convergence. A guest that dirties memory faster than the link
# never converges; auto-converge throttles it until it does.
. "$(dirname "$0")/common.sh"

dest() {  # a destination that waits, then reports into $WORK/dest-$2.txt
  (feed "sleep $1" "info status") |
    $QMON -m 16M -S -incoming "tcp:127.0.0.1:$PORT" -snapshot-dir "$SNAPS" \
      > "$WORK/dest-$2.txt" 2>&1 &
  sleep 1
}

say "The guest writes 32 MB/s over an 8 MiB working set; the link gets 8 MB/s"
dest 8 1
feed "migrate_set_parameter max-bandwidth 8M" "migrate_set_parameter downtime-limit 50" \
     "sleep 1" "migrate -d tcp:127.0.0.1:$PORT" "sleep 4" "info migrate" "info migrate_passes" \
     "migrate_cancel" "sleep 0.5" "info migrate" "info status" |
  $QMON -m 16M -workload dirty,rate=32M,wss=8M -snapshot-dir "$SNAPS" |
  grep -E '^\(qemu\)|^Migration status|^dirty pages rate|^throughput|^dirty sync count|^ *[0-9]+ +[0-9]+ ms|^VM status|^pass'
wait || true
say "That destination lost its stream when the source cancelled:"
cat "$WORK/dest-1.txt"

say "The same guest at 12 MB/s with auto-converge: throttled until the rest fits"
PORT=$((PORT + 1))
dest 18 2
feed "migrate_set_capability auto-converge on" "migrate_set_parameter max-bandwidth 8M" \
     "migrate_set_parameter downtime-limit 100" "sleep 2" "migrate -d tcp:127.0.0.1:$PORT" \
     "sleep 3" "info migrate" "sleep 2" "info migrate" "sleep 2" "info migrate" "sleep 7" \
     "info migrate" "info migrate_passes" "info status" |
  $QMON -m 16M -workload dirty,rate=12M,wss=8M -snapshot-dir "$SNAPS" |
  grep -E '^\(qemu\)|^Migration status|^cpu throttle|^dirty sync count|^downtime:|^ *[0-9]+ \||^VM status'
wait || true
say "The destination"
cat "$WORK/dest-2.txt"
