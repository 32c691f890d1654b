#!/usr/bin/env bash
# slurm.sh - a single-node SLURM cluster on this host, for the cluster test (tests/test_cluster.py)
# and CI. Target: Debian 12 (Slurm 22.05, MUNGE 0.5.15, MariaDB 10.11), run as root; no systemd
# needed: every daemon is started by hand and stopped through its own PID file.
#
# Usage:  tests/cluster/slurm.sh start    install what is missing, start, wait until the node is idle
#         tests/cluster/slurm.sh stop     stop exactly the daemons this script started
#         tests/cluster/slurm.sh status   daemons, sinfo, accounting
# Idempotent: `start` installs nothing twice, restarts only what is not running (everything when
# the generated slurm.conf changed), then smoke-tests srun. `stop` on a stopped cluster is a no-op.
#
# Environment:
#   SLURM_WITH_DBD=1|0   1 (default): MariaDB + slurmdbd, so that `sacct` works: the executor
#                        plugin's default status command, as on real clusters. 0: no accounting
#                        database; then run Snakemake with `slurm-status-command: squeue`, or it
#                        polls a failing `sacct` forever (known trap).
#   SLURM_CLUSTER (ci), SLURM_PARTITION (debug), SLURM_DB_PASS (local MariaDB user password)
#   SLURM_STATE_DIR (/run/rbflow-slurm): where this script records the daemons it started
#   RBFLOW_APT_LOCK (${TMPDIR:-/tmp}/rbflow-apt.lock): the lock file held around apt-get
#
# Exit status: 0 ready; 1 error (message names the log to read); 2 not root / not Debian /
# apt cannot install the packages (callers skip instead of failing).
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
WITH_DBD=${SLURM_WITH_DBD:-1}
CLUSTER=${SLURM_CLUSTER:-ci}
PARTITION=${SLURM_PARTITION:-debug}
DB_PASS=${SLURM_DB_PASS:-slurmdbpass}
STATE=${SLURM_STATE_DIR:-/run/rbflow-slurm}
APT_LOCK=${RBFLOW_APT_LOCK:-${TMPDIR:-/tmp}/rbflow-apt.lock}
CONF=/etc/slurm/slurm.conf
DBD_CONF=/etc/slurm/slurmdbd.conf
LOG_DIR=/var/log/slurm
CTLD_STATE=/var/spool/slurmctld
SLURMD_SPOOL=/var/spool/slurmd
# pid files the daemons write (names match slurm.conf/slurmdbd.conf below)
PID_MUNGED=/run/munge/munged.pid
PID_MARIADB=/run/mysqld/mysqld.pid
PID_DBD=/run/slurmdbd.pid
PID_CTLD=/run/slurmctld.pid
PID_SLURMD=/run/slurmd.pid

log() { printf '[slurm.sh %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
unsupported() { log "UNSUPPORTED: $*"; exit 2; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }  # arg: pid file
wait_for() {  # seconds description command...
  local n=$1 what=$2; shift 2
  for _ in $(seq $((n * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  die "timed out after ${n}s waiting for: $what (logs: $LOG_DIR)"
}
mark_started() { mkdir -p "$STATE"; touch "$STATE/$1"; }  # this script started daemon $1
started_by_us() { [ -e "$STATE/$1" ]; }
stop_pidfile() {  # name pidfile: SIGTERM, wait up to 10 s, then SIGKILL
  if alive "$2"; then
    local pid; pid=$(cat "$2"); log "stopping $1 (pid $pid)"; kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then log "$1 ignores SIGTERM: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  fi
  rm -f "$2" "$STATE/$1"
}
mariadb_up() { mysqladmin --protocol=socket -uroot ping >/dev/null 2>&1; }

do_stop() {
  # only what this script started (a site's own munged or MariaDB is left alone)
  for d in slurmd:$PID_SLURMD slurmctld:$PID_CTLD slurmdbd:$PID_DBD; do
    started_by_us "${d%%:*}" && stop_pidfile "${d%%:*}" "${d#*:}"
  done
  if started_by_us mariadb; then
    if mariadb_up; then  # Debian's init.d stop falls back to `killall mariadbd`: avoid it
      log "stopping mariadb"
      local pid; pid=$(cat "$PID_MARIADB" 2>/dev/null || true)
      mysqladmin --protocol=socket -uroot shutdown 2>/dev/null || stop_pidfile mariadb "$PID_MARIADB"
      if [ -n "$pid" ]; then for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done; fi
    fi
    rm -f "$STATE/mariadb"
  fi
  started_by_us munged && stop_pidfile munged "$PID_MUNGED"
  return 0
}

do_status() {
  for d in munged:$PID_MUNGED mariadb:$PID_MARIADB slurmdbd:$PID_DBD slurmctld:$PID_CTLD slurmd:$PID_SLURMD; do
    if alive "${d#*:}"; then echo "${d%%:*}: running (pid $(cat "${d#*:}"))"; else echo "${d%%:*}: not running"; fi
  done
  sinfo 2>&1 || true
}

case "${1:-}" in
  stop) [ "$(id -u)" -eq 0 ] || unsupported "must run as root"; do_stop; exit 0 ;;
  status) do_status; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 64 ;;
esac
[ "$(id -u)" -eq 0 ] || unsupported "must run as root"
[ -r /etc/debian_version ] && command -v apt-get >/dev/null || unsupported "needs Debian (apt-get)"

# ---------------------------------------------------------------- packages
pkgs=(munge slurmctld slurmd slurm-client)
[ "$WITH_DBD" = 1 ] && pkgs+=(slurmdbd mariadb-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing: ${missing[*]}"
  # --no-install-recommends: slurm-wlm would pull ~35 plugin/-dev packages a CI cluster needs not.
  # Without systemd, postinst scripts cannot start the services: harmless, we start them below.
  apt_log=$(mktemp)
  # the test workers run in parallel (pytest-xdist) and the report test installs chromium: one apt at a
  # time, through the lock file that tests/helpers.py's chromium_binary takes too (flock(2) both)
  if ! flock "$APT_LOCK" sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"' sh "${missing[@]}" >"$apt_log" 2>&1; then
    tail -n 20 "$apt_log" >&2
    unsupported "apt-get cannot install ${missing[*]} (output above)"
  fi
  rm -f "$apt_log"
fi

mkdir -p "$LOG_DIR" "$CTLD_STATE" "$SLURMD_SPOOL" /etc/slurm "$STATE"

# ---------------------------------------------------------------- munge
if [ ! -s /etc/munge/munge.key ]; then  # Debian's postinst normally creates it
  log "creating munge key"
  mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
    || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then  # a running munged (systemd host) is reused
  log "starting munged"
  rm -f "$PID_MUNGED"
  runuser -u munge -- /usr/sbin/munged
  mark_started munged
  wait_for 10 "munged" sh -c 'munge -n | unmunge'
fi

# ---------------------------------------------------------------- MariaDB + slurmdbd
if [ "$WITH_DBD" = 1 ]; then
  if ! mariadb_up; then
    log "starting mariadb"
    # setsid: keep mysqld_safe out of the caller's session (pytest, CI step)
    setsid /etc/init.d/mariadb start </dev/null >/dev/null 2>&1 || true
    mark_started mariadb
    wait_for 60 "mariadb" mariadb_up
  fi
  mysql -uroot -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  dbd_new=$(mktemp)
  cat >"$dbd_new" <<CONF
# generated by tests/cluster/slurm.sh
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
DebugLevel=info
LogFile=${LOG_DIR}/slurmdbd.log
PidFile=${PID_DBD}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
CONF
  if ! cmp -s "$dbd_new" "$DBD_CONF"; then
    install -m 0600 "$dbd_new" "$DBD_CONF"  # slurmdbd refuses a world-readable conf
    stop_pidfile slurmdbd "$PID_DBD"
  fi
  rm -f "$dbd_new"
  if ! alive "$PID_DBD"; then
    log "starting slurmdbd"
    slurmdbd
    mark_started slurmdbd
    # sacctmgr reads slurm.conf (maybe still without accounting): probe the port instead
    wait_for 30 "slurmdbd on port 6819" bash -c 'exec 3<>/dev/tcp/127.0.0.1/6819'
  fi
  ACCT="JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=5
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment"
else
  # no database: sacct fails ("accounting storage is disabled"); jobcomp/filetxt keeps a record
  ACCT="JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"
fi

# ---------------------------------------------------------------- slurm.conf
# hardware from `slurmd -C`; announce 90 % of the memory, so the node never drains "Low RealMemory"
NODE=$(hostname -s)
hw=$(slurmd -C | head -n1)
mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")
cpu=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")
topo=$(grep -o 'CPUs=[0-9]* Boards=[0-9]* SocketsPerBoard=[0-9]* CoresPerSocket=[0-9]* ThreadsPerCore=[0-9]*' <<<"$hw" || echo "CPUs=$cpu")
real_mem=$((mem * 9 / 10))
def_mem=$((real_mem / cpu < 1024 ? real_mem / cpu : 1024))
conf_new=$(mktemp)
cat >"$conf_new" <<CONF
# generated by tests/cluster/slurm.sh: single-node CI cluster
ClusterName=${CLUSTER}
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
# no cgroups: works in containers and VMs without a delegated cgroup tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
${ACCT}
JobCompType=jobcomp/filetxt
JobCompLoc=${LOG_DIR}/jobcomp.log
ReturnToService=2
MailProg=/bin/true
# finished jobs stay visible to squeue for 5 min (the plugin's squeue status mode needs >= 120 s)
MinJobAge=300
SlurmctldPidFile=${PID_CTLD}
SlurmdPidFile=${PID_SLURMD}
SlurmdSpoolDir=${SLURMD_SPOOL}
StateSaveLocation=${CTLD_STATE}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# without a default, a job without --mem would get the whole node's memory
DefMemPerCPU=${def_mem}
NodeName=${NODE} NodeAddr=127.0.0.1 ${topo} RealMemory=${real_mem} State=UNKNOWN
PartitionName=${PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
if ! cmp -s "$conf_new" "$CONF"; then
  log "writing $CONF"
  install -m 0644 "$conf_new" "$CONF"
  stop_pidfile slurmd "$PID_SLURMD"
  stop_pidfile slurmctld "$PID_CTLD"
fi
rm -f "$conf_new"

# ---------------------------------------------------------------- slurmctld + slurmd
if ! alive "$PID_CTLD"; then
  log "starting slurmctld"
  slurmctld  # daemonizes and writes its pid file
  mark_started slurmctld
  wait_for 30 "slurmctld" scontrol ping
fi
if ! alive "$PID_SLURMD"; then
  log "starting slurmd"
  slurmd
  mark_started slurmd
fi
node_ready() {
  local st; st=$(sinfo -h -n "$NODE" -o %t 2>/dev/null)
  case "$st" in
    idle|mix|alloc|comp) return 0 ;;
    *drain*|*down*|*drng*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null; return 1 ;;
    *) return 1 ;;
  esac
}
wait_for 60 "node $NODE to become idle" node_ready
if [ "$WITH_DBD" = 1 ]; then  # slurmctld registers the cluster in slurmdbd by itself
  wait_for 30 "cluster $CLUSTER in slurmdbd" \
    sh -c "sacctmgr -n -P show cluster format=cluster | grep -qx '$CLUSTER'"
fi

# ---------------------------------------------------------------- smoke test
timeout 60 srun -N1 -n1 -t 1 true || die "srun smoke test failed (logs: $LOG_DIR)"
log "ready: cluster=$CLUSTER partition=$PARTITION node=$NODE accounting=$([ "$WITH_DBD" = 1 ] && echo slurmdbd || echo none)"
