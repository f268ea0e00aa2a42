#!/bin/sh
# The Virtual Node Gate (GCA paper, section 4): PID 1 of the guest that scripts/build-vmm-guest
# builds. It mounts the job's disk (the job's directory: its input files and `.gca/cmd`, which
# the execute wrapper wrote), starts the job as the submitting user's UID/GID (`gca.uid=`,
# `gca.gid=` on the kernel command line), and talks to the host over the virtio-serial port
# named `org.gca.gate` (no guest network), one line per message:
#   guest -> host: READY | FILES <bytes> + a tar of the job's directory | EXIT <status> | FAIL <why>
#   host -> guest: TERM (SIGTERM to the job's process group) | BYE (the host has the status)
# The protocol's host side is gca_protocol::gate. A VM checkpointed and restored continues here
# (the job, and this script waiting for it) with the new host connection.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /job
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/gca/modules); do
    insmod "/lib/modules/gca/$m.ko" || echo "gate: cannot load module $m"
done
uid=65534
gid=65534
for a in $(cat /proc/cmdline); do
    case "$a" in
        gca.uid=*) uid=${a#gca.uid=} ;;
        gca.gid=*) gid=${a#gca.gid=} ;;
    esac
done
port=
i=0
while [ -z "$port" ] && [ "$i" -lt 200 ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.gca.gate ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] || { sleep 0.05; i=$((i + 1)); }
done
end() { sync; poweroff -f; sleep 10; }
[ -n "$port" ] || { echo "gate: no virtio-serial port org.gca.gate"; end; }
exec 3<>"$port"
fail() { echo "gate: $*"; echo "FAIL $*" >&3; end; }
i=0
until [ -b /dev/vda ] || [ "$i" -ge 200 ]; do sleep 0.05; i=$((i + 1)); done
mount -t ext4 /dev/vda /job || fail "cannot mount the job disk"
[ -f /job/.gca/cmd ] || fail "the job disk has no .gca/cmd"
echo READY >&3
chown -R "$uid:$gid" /job
cd /job
# setsid: the job leads its own process group, which TERM reaches whole.
echo "job:x:$uid:$gid:job:/job:/bin/sh" >/etc/passwd
echo "job:x:$gid:" >/etc/group
setsid su -s /bin/sh job -c 'exec /bin/sh /job/.gca/cmd' </dev/null >/dev/console 2>&1 &
job=$!
# A read ends (EOF) whenever the host side disconnects, as it does while a checkpointed VM
# is restored elsewhere: read again once the new host connects.
(
    while :; do
        while read -r cmd <&3; do
            case "$cmd" in
                TERM) kill -TERM "-$job" 2>/dev/null || kill -TERM "$job" ;;
            esac
        done
        sleep 0.2
    done
) &
reader=$!
wait "$job"
rc=$?
kill "$reader" 2>/dev/null
sync
# The whole directory; the host leaves .gca and lost+found out when it unpacks.
if tar -cf /tmp/out.tar . 2>/tmp/tar.err; then
    echo "FILES $(wc -c </tmp/out.tar)" >&3
    cat /tmp/out.tar >&3
else
    echo "gate: cannot archive the job's files: $(cat /tmp/tar.err)"
fi
echo "EXIT $rc" >&3
read -r -t 30 ack <&3
cd /
umount /job
end
