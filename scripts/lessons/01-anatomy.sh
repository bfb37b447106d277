#!/usr/bin/env bash
# Lesson 1: the anatomy of a savevm stream. Save a tiny machine, watch the save with trace
# events, then take the stream apart with the dissector.
. "$(dirname "$0")/common.sh"

say "A 1 MiB -M none machine, paused; savevm with the savevm_* trace events on"
head -c 1048576 /dev/zero > "$WORK/ram.bin"
printf 'hello, savevm' | dd of="$WORK/ram.bin" bs=1 seek=8192 conv=notrunc 2>/dev/null
feed "trace-event savevm_* on" "savevm anatomy" "info snapshots" |
  $QMON -M none -m 1M -S -mem-path "$WORK/ram.bin" -snapshot-dir "$SNAPS"

say "The stream, record by record"
$QMON_ANALYZE --tag anatomy --snapshot-dir "$SNAPS"

say "The same bytes with every field labelled (the first lines)"
$QMON_ANALYZE --hexdump --tag anatomy --snapshot-dir "$SNAPS" | head -n 30
