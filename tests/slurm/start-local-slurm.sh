#!/usr/bin/env bash
# Start a real single-node SLURM cluster on loopback (Debian/Ubuntu packages), as root.
#
#   sudo tests/slurm/start-local-slurm.sh
#
# Idempotent: installs slurmctld, slurmd, slurm-client and munge when absent, writes
# /etc/slurm/slurm.conf (one node: this host on 127.0.0.1, CPUs from nproc, RealMemory from
# /proc/meminfo minus a margin), starts munged, slurmctld and slurmd in the background (no
# systemd needed), waits until the node is idle and a `sbatch --wrap hostname` job completes.
# Running it again with the daemons up only re-checks them.
#
# The config must live at the default path: `srun` inside a job (which the Snakemake executor
# uses for every job step) reads /etc/slurm/slurm.conf, not $SLURM_CONF.
#
# Accounting: none (no slurmdbd). snakemake-executor-plugin-slurm 2.6 asks `squeue
# --states=all` for job states when told `--slurm-status-command squeue`, which works as long as
# slurmctld keeps finished jobs for at least 3x the plugin's first status delay; and
# tests/test_zz_slurm.py reads every job's record (state, CPUs) after the whole chain has run,
# which took 11 min on a loaded 2-core machine: MinJobAge=3600 below. Only the plugin's efficiency
# report and failure reasons need sacct (slurmdbd + MariaDB).
set -euo pipefail

log() { echo "[local-slurm] $*"; }
die() { echo "[local-slurm] ERROR: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (installs packages, writes /etc/slurm, starts daemons)"

CONF=/etc/slurm/slurm.conf
STATE=/var/lib/slurm
LOGDIR=/var/log/slurm
NODE=$(hostname -s)
MIN_JOB_AGE=3600

# ---------------------------------------------------------------- packages
missing=()
for pair in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pair%%:*}" ] || missing+=("${pair##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
else
    log "packages present: slurmctld slurmd slurm-client munge"
fi
log "$(slurmctld -V 2>/dev/null || true), munge $(dpkg-query -W -f='${Version}' munge 2>/dev/null || echo '?')"

# ---------------------------------------------------------------- munge
mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then mungekey --create --force >/dev/null
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
fi
chown -R munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
chmod 0700 /etc/munge /var/lib/munge /var/log/munge
chmod 0755 /run/munge
chmod 0400 /etc/munge/munge.key
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "munged already running"
else
    log "starting munged (as user munge)"
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# ---------------------------------------------------------------- slurm.conf
cpus=$(nproc)
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# slurmd drains a node whose RealMemory exceeds what it sees: keep 10% (at least 512 MB) spare.
margin=$(( mem_total_mb / 10 > 512 ? mem_total_mb / 10 : 512 ))
real_mem=$(( mem_total_mb - margin ))
mkdir -p /etc/slurm "$STATE/slurmctld" "$STATE/slurmd" "$LOGDIR"
new_conf=$(cat <<EOF
# Written by glandpet tests/slurm/start-local-slurm.sh: one node on loopback, no accounting.
ClusterName=glandpet-local
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# squeue must still list finished jobs when the executor asks (see the header of this script).
MinJobAge=${MIN_JOB_AGE}
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=${STATE}/slurmctld
SlurmdSpoolDir=${STATE}/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldTimeout=60
SlurmdTimeout=60
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${real_mem} State=UNKNOWN
PartitionName=local Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
EOF
)
changed=0
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$new_conf" ]; then
    printf '%s\n' "$new_conf" > "$CONF"
    changed=1
    log "wrote $CONF: node ${NODE} (127.0.0.1), CPUs=${cpus}, RealMemory=${real_mem} MB, MinJobAge=${MIN_JOB_AGE}s"
else
    log "$CONF unchanged"
fi

# ---------------------------------------------------------------- daemons
ctld_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
slurmd_up() { [ -s /run/slurmd.pid ] && kill -0 "$(cat /run/slurmd.pid)" 2>/dev/null; }

if [ "$changed" = 1 ] && ctld_up; then
    log "config changed: stopping the running daemons (scontrol shutdown)"
    scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 50); do ctld_up || slurmd_up || break; sleep 0.2; done
fi
if ctld_up; then
    log "slurmctld already running"
else
    log "starting slurmctld"
    slurmctld
    for _ in $(seq 100); do ctld_up && break; sleep 0.2; done
    ctld_up || die "slurmctld did not come up (see $LOGDIR/slurmctld.log)"
fi
if slurmd_up; then
    log "slurmd already running"
else
    log "starting slurmd"
    slurmd
fi

# ---------------------------------------------------------------- wait for an idle node
state=""
for _ in $(seq 120); do
    state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mixed|allocated|completing) break ;;
        down*|drain*|drained*)
            scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case "$state" in
    idle|mixed|allocated|completing) log "node ${NODE} is ${state}" ;;
    *) sinfo -N -l >&2 || true; die "node ${NODE} is '${state}', not idle (see $LOGDIR/slurmd.log)" ;;
esac

# ---------------------------------------------------------------- a real job
out=$(mktemp /tmp/local-slurm-check.XXXXXX)
jobid=$(sbatch --parsable --job-name local-slurm-check --time 1 --mem 100 -o "$out" --wrap hostname)
# --wait is not used: on a busy node it can block for long; poll the job's state instead.
for _ in $(seq 240); do
    jstate=$(scontrol show job "$jobid" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p' | head -1)
    case "$jstate" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
    sleep 0.5
done
[ "${jstate:-}" = COMPLETED ] && [ "$(cat "$out")" = "$(hostname)" ] \
    || die "test job $jobid ended ${jstate:-unknown}: $(cat "$out" 2>/dev/null)"
rm -f "$out"
log "test job $jobid (sbatch --wrap hostname) completed on $(hostname)"
log "ready: $(sinfo -h -o '%P %D node(s) %c CPUs %m MB %T')"
