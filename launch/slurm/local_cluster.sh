#!/usr/bin/env bash
# A real Slurm on one machine, with two fake nodes (node1, node2) sharing this host: for testing the
# job scripts with real sbatch/srun. Needs Debian's slurm-wlm and munge:
#   apt-get install --no-install-recommends slurm-wlm munge
#
#   launch/slurm/local_cluster.sh start DIR [CTLD_PORT]   # writes DIR/slurm.conf, starts the daemons
#   SLURM_CONF=DIR/slurm.conf sbatch --nodes 2 ...
#   launch/slurm/local_cluster.sh stop DIR                # stops only the daemons started from DIR
#
# Nothing system-wide is changed except a munge daemon (started only if none runs). Jobs on the fake
# nodes should export MASTER_ADDR=127.0.0.1: the node names resolve nowhere.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"   # the daemons live in sbin, which a non-login PATH may lack
cmd=${1:?usage: local_cluster.sh start|stop DIR [PORT]}
dir=$(realpath -m "${2:?missing DIR}")
port=${3:-$(( 17000 + RANDOM % 3000 ))}

stop() {
    for f in "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid "$dir"/slurmctld.pid "$dir"/munged.pid; do
        [ -f "$f" ] || continue
        pid=$(cat "$f")
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        rm -f "$f"
    done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "unknown command $cmd" >&2; exit 2; }
for bin in slurmctld slurmd munged sbatch; do
    command -v "$bin" >/dev/null || { echo "$bin not found: apt-get install --no-install-recommends slurm-wlm munge" >&2; exit 3; }
done
mkdir -p "$dir"/state "$dir"/spool/node1 "$dir"/spool/node2 "$dir"/tmp/node1 "$dir"/tmp/node2
rm -rf "$dir"/state/*
host=$(hostname -s)

if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    runuser -u munge -- /usr/sbin/munged
    pgrep -x -n munged > "$dir/munged.pid"
fi

cat > "$dir/slurm.conf" <<CONF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$(( port + 1 ))
AuthType=auth/munge
# Requeued jobs may start again once their old credentials expire (default 120 s): keep tests short.
AuthInfo=cred_expire=10
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmdSpoolDir=$dir/spool/%n
TmpFS=$dir/tmp/%n
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd-%n.log
KillWait=30
NodeName=node[1-2] NodeHostname=$host NodeAddr=127.0.0.1 Port=[$(( port + 1 ))-$(( port + 2 ))] CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
CONF

export SLURM_CONF="$dir/slurm.conf"
slurmctld -i -f "$SLURM_CONF"
slurmd -N node1 -f "$SLURM_CONF"
slurmd -N node2 -f "$SLURM_CONF"
for _ in $(seq 100); do
    if [ "$(sinfo -h -o '%t' 2>/dev/null | sort -u | tr -d '\n')" = idle ]; then
        echo "slurm up: SLURM_CONF=$SLURM_CONF"; exit 0
    fi
    sleep 0.2
done
echo "slurm did not come up; logs in $dir" >&2
sinfo >&2 || true
stop
exit 1
