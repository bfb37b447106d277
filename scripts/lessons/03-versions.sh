#!/usr/bin/env bash
# Lesson 3: strict versions. Version 3 checks every section's version; version 2 did not.
. "$(dirname "$0")/common.sh"

say "lab-1.0 has cpu v1, lab-2.0 (lab) has cpu v2; a snapshot of each"
feed "savevm old" | $QMON -M lab-1.0 -m 2M -S -snapshot-dir "$SNAPS"
feed "savevm new" | $QMON -M lab-2.0 -m 2M -S -snapshot-dir "$SNAPS"

say "Older into newer: the field v2 added takes its default"
feed "loadvm old" "info registers" | $QMON -M lab-2.0 -m 2M -S -snapshot-dir "$SNAPS" || true

say "Newer into older: version 3 refuses, and the machine stays as it was"
feed "loadvm new" "info status" | $QMON -M lab-1.0 -m 2M -S -snapshot-dir "$SNAPS" || true

say "Version 2: the container that must seek; exec: is refused, a file works"
feed "migrate_set_parameter x-stream-version 2" 'migrate "exec:cat > /dev/null"' \
     "migrate file:$WORK/new.v2" "info status" |
  $QMON -M lab-2.0 -m 2M -snapshot-dir "$SNAPS" || true

say "The v2 stream of cpu v2 into lab-1.0 loads without a word; xcr0, which v1 lacks, is silently dropped"
(feed "sleep 1.5" "info status" "info registers") |
  $QMON -M lab-1.0 -m 2M -S -incoming "file:$WORK/new.v2" -snapshot-dir "$SNAPS"

say "A v2 record nobody knows is skipped with a warning, and the load goes on"
sed 's/serial/sexial/' "$WORK/new.v2" > "$WORK/odd.v2"
(feed "sleep 1.5" "info status") |
  $QMON -M lab-2.0 -m 2M -S -incoming "file:$WORK/odd.v2" -snapshot-dir "$SNAPS"
