#!/usr/bin/env bash
# A real one-node SLURM cluster on localhost, for tests of sbatch/srun scripts.
# Usage:  bash tools/slurm_local.sh start   # installs (Debian slurm-wlm, munge) if missing, starts, waits
#         bash tools/slurm_local.sh stop    # stops the daemons it started (by their PID files)
# Needs root. The node has the machine's CPUs; partition "debug" is the default. State lives in /var/spool/slurm-local.
set -euo pipefail
STATE=/var/spool/slurm-local
CONF=/etc/slurm/slurm.conf
cmd=${1:-start}

stop() {
  for d in slurmd slurmctld munged; do
    f=$STATE/$d.pid
    if [ -s "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then
      pid=$(cat "$f"); kill "$pid"
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    fi
    rm -f "$f"
  done
}

if [ "$cmd" = stop ]; then stop; exit 0; fi
[ "$cmd" = start ] || { echo "usage: $0 start|stop" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null
fi
stop  # a clean restart is cheaper than reasoning about half-started daemons

host=$(hostname -s)
cpus=$(nproc)
mem=$(( $(awk '/MemTotal/ {print int($2/1024)}' /proc/meminfo) * 9 / 10 ))
mkdir -p "$STATE"/{ctld,d} /etc/slurm /etc/munge /run/munge /var/log/munge /var/lib/munge
cat > "$CONF" <<CONF
ClusterName=local
SlurmctldHost=$host
AuthType=auth/munge
AuthInfo=cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=2
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
rm -f /etc/slurm/cgroup.conf  # 22.05 loads cgroup/v1 by default; 'disabled' is unknown to it

[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
  || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
runuser -u munge -- munged --pid-file=/run/munge/munged.pid 2>/dev/null || munged --force
sleep 1; cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null || true
slurmctld
slurmd
for _ in $(seq 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
    echo "slurm-local: node $host up ($cpus CPUs); try: sbatch --wait job.sh; logs in $STATE"
    exit 0
  fi
  sleep 1
done
echo "slurm-local: node did not come up; see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
