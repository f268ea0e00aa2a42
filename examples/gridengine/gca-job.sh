#!/bin/bash
# A GCA job under Grid Engine that survives migration, rescheduling and node failure: submit
# it with the "gca" checkpointing environment (examples/gridengine/gca.ckpt).
#
#   qsub -ckpt gca -v GID=job-42,CTS_URL=unix:/run/gca/cts.sock examples/gridengine/gca-job.sh \
#        ./my-solver --input data.in
#
# It runs the job through the self-recovering mode of the execute wrapper
# (gca-exec --recover-if-checkpointed): at the first start the job is executed (and registered
# at the CTS of the host); whenever Grid Engine starts it again (restart_command after a
# migration, or this script after `qmod -rj`, a reschedule or a host failure) it is recovered
# from its latest usable checkpoint, or executed from the beginning if it was never
# checkpointed. The wrapper is exec'd, so the job keeps the PID Grid Engine knows; a
# recovered job's wrapper stays its parent, forwards signals and exits like the job, so
# Grid Engine's accounting (qacct -j) records the job's own exit status.
#
# Environment (qsub -v, or -V to pass the submitting shell's):
#   GID          the job's global identifier (required; the same across restarts)
#   CTS_URL      the CTS of the execution host: unix:/path/to/cts.sock, or its URL (required)
#   KEEP_IN, KEEP_LAST  optional retention policy, as for gca-exec --keep-last/--keep-all
#   GCA_EXEC     the execute wrapper, if not on the job's PATH
#$ -S /bin/bash
#$ -ckpt gca
set -u

: "${GID:?set GID, the global identifier of the job (qsub -v GID=...)}"
: "${CTS_URL:?set CTS_URL, the CTS of the execution host (qsub -v CTS_URL=...)}"
[ "$#" -gt 0 ] || { echo "usage: qsub -ckpt gca gca-job.sh JOB [ARGS...]" >&2; exit 2; }

retention=()
if [ -n "${KEEP_IN:-}" ]; then
    if [ -n "${KEEP_LAST:-}" ]; then
        retention=(--keep-last "$KEEP_LAST" --keep-in "$KEEP_IN")
    else
        retention=(--keep-all --keep-in "$KEEP_IN")
    fi
fi

exec "${GCA_EXEC:-gca-exec}" --recover-if-checkpointed --gid "$GID" --cts "$CTS_URL" \
    "${retention[@]}" -- "$@"
