#!/usr/bin/env bash
# A one-node SLURM cluster on this machine (munge + slurmctld + slurmd on localhost), for running
# examples/slurm/train_emo.sbatch for real in --cpu mode (tests/training/test_slurm.py). Idempotent:
# installs Debian's packages when they are missing (root + apt-get), writes /etc/slurm/slurm.conf
# (only if absent or written by this script), starts whatever daemon is not running, and waits
# until the node takes jobs.
#   sudo bash tools/local_slurm.sh            # start (or check) the cluster
#   sudo bash tools/local_slurm.sh stop       # stop the daemons this script starts
# Exit status 3: SLURM cannot be installed or started here (no root, or no apt-get).
set -euo pipefail
ACTION=${1:-start}
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
MARK="# written by megatron-emo tools/local_slurm.sh"
LOG_DIR=${LOG_DIR:-/var/log/slurm}
STATE_DIR=${STATE_DIR:-/var/lib/slurm}
NODE=$(hostname -s)

say() { echo "local_slurm: $*"; }

stop() {
    for daemon in slurmd slurmctld; do
        if pid=$(pgrep -x "$daemon"); then say "stopping $daemon ($pid)"; kill $pid; fi
    done
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
        say "cannot install ${missing[*]}: needs root and apt-get (Debian/Ubuntu)" >&2
        exit 3
    fi
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; then
        apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends "${missing[@]}" \
            >/dev/null || { say "apt-get could not install ${missing[*]}" >&2; exit 3; }
    fi
}

start_munge() {
    if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
    [ -s /etc/munge/munge.key ] || {
        say "creating /etc/munge/munge.key"
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    }
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 0400 /etc/munge/munge.key
    chmod 0755 /run/munge
    say "starting munged"
    runuser -u munge -- munged
    for _ in $(seq 50); do
        munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    say "munged does not answer" >&2
    exit 1
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qxF "$MARK" "$CONF"; then
        say "$CONF exists and was not written by this script; leaving it alone"
        return 0
    fi
    # The node as slurmd sees it (CPUs, sockets, cores, memory), so it is never drained for
    # "low socket*core*thread count".
    local hw
    hw=$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]* //")
    mkdir -p "$(dirname "$CONF")" "$LOG_DIR" "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd"
    local new
    new=$(cat <<EOF
$MARK
ClusterName=emo-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
StateSaveLocation=$STATE_DIR/slurmctld
SlurmdSpoolDir=$STATE_DIR/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobCompType=jobcomp/none
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
)
    if [ -f "$CONF" ] && [ "$(cat "$CONF")" = "$new" ]; then return 0; fi
    say "writing $CONF"
    printf '%s\n' "$new" > "$CONF"
    stop  # running daemons would keep the old configuration
}

start_slurm() {
    pgrep -x slurmctld >/dev/null || { say "starting slurmctld"; slurmctld; }
    for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
    pgrep -x slurmd >/dev/null || { say "starting slurmd"; slurmd; }
    local state=""
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)
        case "$state" in
            idle*|mixed*|allocated*|completing*) say "node $NODE is $state"; return 0 ;;
            down*|drain*|fail*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    say "node $NODE did not become available (state '$state'; see $LOG_DIR)" >&2
    exit 1
}

cluster_up() {
    command -v sinfo >/dev/null && scontrol ping 2>/dev/null | grep -q UP &&
        sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq "^(idle|mixed|allocated)"
}

case "$ACTION" in
    start)
        if [ "$(id -u)" != 0 ]; then
            cluster_up && { say "cluster is up (node $NODE)"; exit 0; }
            say "the cluster is not running and starting it needs root" >&2
            exit 3
        fi
        install_packages; start_munge; write_conf; start_slurm ;;
    stop) stop ;;
    *) echo "usage: $0 [start|stop]" >&2; exit 2 ;;
esac
