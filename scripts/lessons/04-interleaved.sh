#!/usr/bin/env bash
# Lesson 4: interleaved live sections. With migrate -b the disk travels as a second live
# section ("block") whose PART records alternate with ram's in one stream.
. "$(dirname "$0")/common.sh"

head -c 4194304 /dev/urandom > "$WORK/disk.img"
truncate -s 4M "$WORK/dest.img"

say "A lab machine with a 4 MiB disk migrates with -b into a stream file"
feed "migrate_set_parameter max-bandwidth 16M" "migrate -b \"exec:cat > $WORK/blk.stream\"" \
     "info migrate" |
  $QMON -m 4M -drive "file=$WORK/disk.img" -snapshot-dir "$SNAPS" | head -n 12

say "The sections of that stream: START block, START ram, then PART block / PART ram ..."
$QMON_ANALYZE "$WORK/blk.stream" | grep -E 'START|PART|END|FULL' | head -n 12

say "A destination with its own disk takes it; the disks end identical"
(feed "sleep 1.5" "info status") |
  $QMON -m 4M -S -drive "file=$WORK/dest.img" -incoming "exec:cat $WORK/blk.stream" \
        -snapshot-dir "$SNAPS"
cmp "$WORK/disk.img" "$WORK/dest.img" && echo "disks identical"
