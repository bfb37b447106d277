# Shared by the lessons: where qmon is, a scratch directory, and a way to feed a monitor
# commands at a pace (a lesson is a conversation, not a batch).
set -eu
QMON=${QMON:-qmon}
QMON_ANALYZE=${QMON_ANALYZE:-qmon-analyze}
WORK=${LESSON_DIR:-$(mktemp -d -t qmon-lesson-XXXXXX)}
mkdir -p "$WORK"
SNAPS="$WORK/snapshots"
PORT=${LESSON_PORT:-$((20000 + RANDOM % 20000))}

# say "text": a heading in the transcript
say() { printf '\n### %s\n' "$*"; }

# feed CMD... : print each argument as a monitor line; "sleep N" pauses instead
feed() {
  for line in "$@"; do
    case "$line" in
      "sleep "*) sleep "${line#sleep }" ;;
      *) printf '%s\n' "$line" ;;
    esac
  done
}
