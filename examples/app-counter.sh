#!/usr/bin/env bash
# app-counter.sh - a demo application-level checkpointing job for the GCA CTS (driver `app`,
# class `basic`). It follows the protocol in cts/src/driver/app.rs:
#
#   - it counts: every APP_COUNTER_STEP seconds (default 0.1) it increments a counter and
#     appends the new value to a log file (the first argument, else $APP_COUNTER_LOG, else none);
#   - on SIGUSR1 (a checkpoint request from the CTS) it writes the counter to
#     "$GCA_CHECKPOINT_DIR/state" and then the marker "$GCA_CHECKPOINT_DIR/.gca-complete"
#     (atomically: a temporary name, then rename);
#   - every APP_SELF_CHECKPOINT_EVERY increments (0 = never, the default) it takes a checkpoint
#     on its own the same way (an internal checkpoint), unless a marker is still pending;
#   - with --restart-from=DIR it reads the counter from DIR/state and continues from it;
#   - on SIGTERM or SIGINT it finishes the current step and exits 0.
#
# Usage: app-counter.sh [--restart-from=DIR] [LOG]
#
# Example, by hand:
#   mkdir -p /tmp/ckpt && GCA_CHECKPOINT_DIR=/tmp/ckpt examples/app-counter.sh /tmp/count.log &
#   kill -USR1 $!; sleep 0.5; cat /tmp/ckpt/state /tmp/ckpt/.gca-complete
#   rm /tmp/ckpt/.gca-complete     # what the CTS does after moving the files out
#   kill $!
#   GCA_CHECKPOINT_DIR=/tmp/ckpt examples/app-counter.sh --restart-from=/tmp/ckpt /tmp/count.log

set -u

usage() {
    echo "usage: $0 [--restart-from=DIR] [LOG]" >&2
    exit 2
}

restart_from=""
log="${APP_COUNTER_LOG:-}"
for arg in "$@"; do
    case "$arg" in
        --restart-from=*) restart_from="${arg#--restart-from=}" ;;
        -h | --help) usage ;;
        -*) echo "$0: unknown option $arg" >&2; usage ;;
        *) log="$arg" ;;
    esac
done
[ -n "$log" ] || log=/dev/null

dir="${GCA_CHECKPOINT_DIR:-}"
if [ -z "$dir" ] || [ ! -d "$dir" ]; then
    echo "$0: GCA_CHECKPOINT_DIR must name an existing directory" >&2
    exit 2
fi
marker="$dir/.gca-complete"

every="${APP_SELF_CHECKPOINT_EVERY:-0}"
step="${APP_COUNTER_STEP:-0.1}"
case "$every" in '' | *[!0-9]*) echo "$0: APP_SELF_CHECKPOINT_EVERY must be a number" >&2; exit 2 ;; esac

counter=0
if [ -n "$restart_from" ]; then
    if ! read -r counter <"$restart_from/state"; then
        echo "$0: cannot read $restart_from/state" >&2
        exit 2
    fi
    case "$counter" in '' | *[!0-9]*) echo "$0: $restart_from/state holds no counter" >&2; exit 2 ;; esac
    # The restored files stay in the directory; this job rewrites "state" at every checkpoint,
    # so nothing stale is left behind.
fi

requested=0
stopping=0
sleeper=""
trap 'requested=1' USR1
trap 'stopping=1' TERM INT
trap '[ -n "$sleeper" ] && kill "$sleeper" 2>/dev/null' EXIT

# Writes one checkpoint (reason: "request" or "self"). The directory is ours only while no
# marker exists; the marker is written last, under a temporary name and then renamed.
checkpoint() {
    [ -e "$marker" ] && return 1
    local value="$counter"
    printf '%s\n' "$value" >"$dir/state" || return 1
    printf 'counter %s (%s checkpoint, pid %s)\n' "$value" "$1" "$$" >"$marker.tmp" || return 1
    mv -f "$marker.tmp" "$marker" || return 1
    # Any checkpoint completed after a request answers it.
    requested=0
    return 0
}

while [ "$stopping" -eq 0 ]; do
    counter=$((counter + 1))
    printf '%s\n' "$counter" >>"$log"
    if [ "$requested" -eq 1 ]; then
        # A pending marker means the CTS is still collecting: try again next step.
        checkpoint request
    fi
    if [ "$every" -gt 0 ] && [ $((counter % every)) -eq 0 ]; then
        checkpoint self
    fi
    [ "$stopping" -eq 0 ] || break
    # Sleep in the background and wait for it, so that traps run as soon as a signal comes.
    sleep "$step" &
    sleeper=$!
    wait "$sleeper"
    sleeper=""
done
exit 0
