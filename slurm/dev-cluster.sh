#!/usr/bin/env bash
# A real two-node Slurm cluster on this one machine, for development and CI.
#
#   slurm/dev-cluster.sh up        start it (installing the Debian packages if missing);
#                                  idempotent; the LAST line of stdout is
#                                  `export SLURM_CONF=...`, so:
#                                      eval "$(slurm/dev-cluster.sh up | tail -1)"
#   slurm/dev-cluster.sh down      cancel all jobs, wait for them, stop what we started
#   slurm/dev-cluster.sh down --purge   ... and delete all state (next `up` is fresh)
#   slurm/dev-cluster.sh status    daemons, sinfo, squeue; exit 0 if up, 1 if not
#   slurm/dev-cluster.sh install   only install the packages
#
# Needs root (Debian/Ubuntu, apt-get). No systemd needed: daemons are started by hand.
# Everything (configs, logs, spool, state, munge key, MariaDB data) lives in
#   DEV_CLUSTER_DIR            (default /tmp/allconv-dev-cluster; logs in $DIR/log/)
# Other knobs (environment):
#   DEV_CLUSTER_ACCOUNTING=0   run without slurmdbd/MariaDB (sacct then does not work;
#                              submitit's job.state stays UNKNOWN). Default 1: accounting
#                              is required and `up` fails loudly if it cannot start.
#   DEV_CLUSTER_PORT_BASE      ports used: base+17 slurmctld, +19 slurmdbd, +21/+22 slurmd
#                              n1/n2, +30 MariaDB (127.0.0.1 only). Default 16800.
#   DEV_CLUSTER_CPUS           CPUs per node (default: max(2, nproc))
#   DEV_CLUSTER_MEM_MB         RealMemory per node (default: min(8192, MemTotal/2))
#   DEV_CLUSTER_GRACE_TIME     GraceTime of partition `low` in seconds (default 20)
#
# Layout: munged (own key and socket), [mariadbd, slurmdbd], slurmctld, and two slurmd's
# (-N n1, -N n2) that run in a private mount namespace where /etc/hosts has
# `127.0.0.1 n1 n2` bind-mounted over it: job steps inherit it, so node names resolve
# (MASTER_ADDR=n1 works for DDP) without editing the host's /etc/hosts.
# Partitions: low (default, PriorityTier=1, GraceTime) and high (PriorityTier=10);
# a high job preempts (requeues) low jobs, sending them their --signal first.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TEMPLATES="$SCRIPT_DIR/templates"
DIR="${DEV_CLUSTER_DIR:-/tmp/allconv-dev-cluster}"
ACCOUNTING="${DEV_CLUSTER_ACCOUNTING:-1}"
PORT_BASE="${DEV_CLUSTER_PORT_BASE:-16800}"
CTLD_PORT=$((PORT_BASE + 17))
DBD_PORT=$((PORT_BASE + 19))
N1_PORT=$((PORT_BASE + 21))
N2_PORT=$((PORT_BASE + 22))
MYSQL_PORT=$((PORT_BASE + 30))
GRACE="${DEV_CLUSTER_GRACE_TIME:-20}"
CLUSTER=allconv
NODES=(n1 n2)
DB_USER=slurm
DB_PASS=allconv-dev-only

CONF="$DIR/etc/slurm.conf"
DBD_CONF="$DIR/etc/slurmdbd.conf"
HOSTS_FILE="$DIR/etc/hosts"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_KEY="$MUNGE_DIR/munge.key"
MUNGE_PID="$MUNGE_DIR/munged.pid"
MYSQL_DATA="$DIR/mysql"
MYSQL_SOCKET="$DIR/run/mysqld.sock"
MYSQL_PID="$DIR/run/mariadb.pid"

export SLURM_CONF="$CONF"

log() { echo "dev-cluster: $*" >&2; }
die() { echo "dev-cluster: ERROR: $*" >&2; exit 1; }

# Print the last lines of a log file to stderr (for error messages).
tail_log() {
    local f="$1" n="${2:-25}"
    if [[ -s "$f" ]]; then
        echo "----- last $n lines of $f -----" >&2
        tail -n "$n" "$f" >&2 || true
        echo "-----" >&2
    fi
}

require_root() {
    [[ "$(id -u)" == 0 ]] || die "must run as root (the daemons run as root and the slurmd's need a private mount namespace); try: sudo $0 $*"
}

# ---------------------------------------------------------------- processes and pid files

# pid_alive PIDFILE COMM -> prints the pid and succeeds if the process lives and its
# command name starts with COMM (guards against a stale pid file and a reused pid).
pid_alive() {
    local pidfile="$1" comm="$2" pid name
    [[ -s "$pidfile" ]] || return 1
    pid="$(tr -dc '0-9' <"$pidfile")"
    [[ -n "$pid" ]] || return 1
    name="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
    [[ "$name" == "$comm"* ]] || return 1
    echo "$pid"
}

# stop_daemons TIMEOUT NAME:PIDFILE:COMM...: TERM them all at once, wait, then KILL.
stop_daemons() {
    local timeout="$1" d name pidfile comm pid i alive
    shift
    local -a pids=() pidfiles=()
    for d in "$@"; do
        IFS=: read -r name pidfile comm <<<"$d"
        if pid="$(pid_alive "$pidfile" "$comm")"; then
            log "stopping $name (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid")
        fi
        pidfiles+=("$pidfile")
    done
    for ((i = 0; i < timeout * 10; i++)); do
        alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    for pid in "${pids[@]}"; do
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid ($(cat "/proc/$pid/comm" 2>/dev/null)) did not stop in ${timeout}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "${pidfiles[@]}"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND every 0.2 s.
wait_for() {
    local secs="$1" what="$2" i
    shift 2
    for ((i = 0; i < secs * 5; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out after ${secs}s waiting for $what"
    return 1
}

port_in_use() { [[ -n "$(ss -Htln "sport = :$1" 2>/dev/null)" ]]; }

# check_port PORT NAME: fail clearly when a port we need is taken by someone else.
check_port() {
    local port="$1" name="$2"
    if port_in_use "$port"; then
        echo "dev-cluster: ERROR: TCP port $port (for $name) is already in use:" >&2
        ss -Htlnp "sport = :$port" >&2 || true
        die "port $port for $name is in use; stop that program or choose other ports with DEV_CLUSTER_PORT_BASE (now $PORT_BASE)"
    fi
}

# ---------------------------------------------------------------- install

missing_commands() {
    local c cmds=(slurmctld slurmd slurmstepd sbatch squeue sinfo scontrol scancel srun munged mungekey unmunge ss unshare)
    if [[ "$ACCOUNTING" != 0 ]]; then
        cmds+=(slurmdbd sacct sacctmgr mariadb-install-db mariadb mariadb-admin)
    fi
    for c in "${cmds[@]}"; do
        command -v "$c" >/dev/null 2>&1 || [[ -x "/usr/sbin/$c" ]] || echo "$c"
    done
    if [[ "$ACCOUNTING" != 0 ]] && ! command -v mariadbd >/dev/null 2>&1 && ! [[ -x /usr/sbin/mariadbd ]]; then
        echo mariadbd
    fi
}

do_install() {
    local missing
    missing="$(missing_commands | tr '\n' ' ')"
    [[ -n "${missing// /}" ]] || return 0
    command -v apt-get >/dev/null 2>&1 || die "missing commands ($missing) and no apt-get to install them"
    local pkgs=(slurm-wlm slurm-client munge iproute2 util-linux)
    if [[ "$ACCOUNTING" != 0 ]]; then pkgs+=(slurmdbd mariadb-server mariadb-client); fi
    log "installing ${pkgs[*]} (missing: $missing)"
    # Keep the packages' own services from starting (we start our own daemons); only
    # when there is no policy already, and remove ours afterwards.
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    {
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >&2 &&
            apt-get install -y -q "${pkgs[@]}" >&2
    } || rc=$?
    if [[ "$made_policy" == 1 ]]; then rm -f "$policy"; fi
    [[ "$rc" == 0 ]] || die "apt-get install ${pkgs[*]} failed (exit $rc)"
    missing="$(missing_commands | tr '\n' ' ')"
    [[ -z "${missing// /}" ]] || die "still missing after install: $missing"
}

# ---------------------------------------------------------------- configuration

render() { # render TEMPLATE OUT: substitute @VARS@
    local tmpl="$1" out="$2" accounting_lines
    if [[ "$ACCOUNTING" != 0 ]]; then
        accounting_lines="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# munged runs on a non-default socket: slurmctld finds it through this.
AccountingStoragePass=$MUNGE_SOCKET"
    else
        accounting_lines="AccountingStorageType=accounting_storage/none"
    fi
    local cpus mem_mb
    cpus="${DEV_CLUSTER_CPUS:-$(nproc)}"
    ((cpus >= 2)) || cpus=2
    if [[ -n "${DEV_CLUSTER_MEM_MB:-}" ]]; then
        mem_mb="$DEV_CLUSTER_MEM_MB"
    else
        mem_mb=$(($(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 / 2))
        ((mem_mb <= 8192)) || mem_mb=8192
    fi
    local content
    content="$(<"$tmpl")"
    content="${content//@DIR@/$DIR}"
    content="${content//@CLUSTER@/$CLUSTER}"
    content="${content//@HOST@/$(hostname)}"
    content="${content//@CTLD_PORT@/$CTLD_PORT}"
    content="${content//@DBD_PORT@/$DBD_PORT}"
    content="${content//@N1_PORT@/$N1_PORT}"
    content="${content//@N2_PORT@/$N2_PORT}"
    content="${content//@MYSQL_PORT@/$MYSQL_PORT}"
    content="${content//@MUNGE_SOCKET@/$MUNGE_SOCKET}"
    content="${content//@CPUS@/$cpus}"
    content="${content//@MEM_MB@/$mem_mb}"
    content="${content//@GRACE@/$GRACE}"
    content="${content//@DB_USER@/$DB_USER}"
    content="${content//@DB_PASS@/$DB_PASS}"
    content="${content//@ACCOUNTING@/$accounting_lines}"
    printf '%s\n' "$content" >"$out"
}

# Writes the configs; returns 0 if nothing changed, 1 if something did.
write_configs() {
    local changed=0 f
    mkdir -p "$DIR/etc"
    render "$TEMPLATES/slurm.conf.in" "$CONF.new"
    { cat /etc/hosts; echo "127.0.0.1 ${NODES[*]}  # dev-cluster node names"; } >"$HOSTS_FILE.new"
    if [[ "$ACCOUNTING" != 0 ]]; then
        (umask 077 && render "$TEMPLATES/slurmdbd.conf.in" "$DBD_CONF.new")
    fi
    for f in "$CONF" "$HOSTS_FILE" "$DBD_CONF"; do
        [[ -e "$f.new" ]] || continue
        if ! cmp -s "$f.new" "$f"; then
            mv -f "$f.new" "$f"
            changed=1
        else
            rm -f "$f.new"
        fi
    done
    chmod 644 "$CONF" "$HOSTS_FILE"
    [[ ! -e "$DBD_CONF" ]] || chmod 600 "$DBD_CONF"
    return "$changed"
}

make_dirs() {
    mkdir -p "$DIR"/{etc,log,run,state/slurmctld,spool}
    chmod 755 "$DIR" "$DIR/etc" "$DIR/log" "$DIR/run"
    local n
    for n in "${NODES[@]}"; do mkdir -p "$DIR/spool/slurmd-$n"; done
}

# ---------------------------------------------------------------- daemons

munge_ok() { munge --socket="$MUNGE_SOCKET" -n 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1; }

start_munge() {
    if pid_alive "$MUNGE_PID" munged >/dev/null && munge_ok; then return 0; fi
    mkdir -p "$MUNGE_DIR"
    chown munge:munge "$MUNGE_DIR"
    chmod 755 "$MUNGE_DIR" # a socket folder of mode 700 is refused by the clients
    if [[ ! -s "$MUNGE_KEY" ]]; then
        mungekey --create --keyfile="$MUNGE_KEY" 2>/dev/null ||
            dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 600 "$MUNGE_KEY"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    log "starting munged (socket $MUNGE_SOCKET)"
    runuser -u munge -- munged --force --socket="$MUNGE_SOCKET" --key-file="$MUNGE_KEY" \
        --pid-file="$MUNGE_PID" --log-file="$MUNGE_DIR/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" ||
        { tail_log "$MUNGE_DIR/munged.log"; die "munged failed to start"; }
    ln -sf "$MUNGE_DIR/munged.log" "$DIR/log/munged.log"
    wait_for 10 "munge to answer" munge_ok ||
        { tail_log "$MUNGE_DIR/munged.log"; die "munged does not answer on $MUNGE_SOCKET"; }
}

mysql_ok() { mariadb-admin --no-defaults --socket="$MYSQL_SOCKET" -uroot ping; }

start_mariadb() {
    if pid_alive "$MYSQL_PID" mariadbd >/dev/null && mysql_ok >/dev/null 2>&1; then return 0; fi
    local mariadbd
    mariadbd="$(command -v mariadbd || echo /usr/sbin/mariadbd)"
    check_port "$MYSQL_PORT" mariadb
    if [[ ! -d "$MYSQL_DATA/mysql" ]]; then
        log "initialising MariaDB in $MYSQL_DATA"
        rm -rf "$MYSQL_DATA"
        mkdir -p "$MYSQL_DATA"
        mariadb-install-db --no-defaults --user=root --datadir="$MYSQL_DATA" \
            --auth-root-authentication-method=socket --skip-test-db \
            >"$DIR/log/mariadb-install.log" 2>&1 ||
            { tail_log "$DIR/log/mariadb-install.log"; die "mariadb-install-db failed"; }
    fi
    log "starting mariadbd (127.0.0.1:$MYSQL_PORT)"
    rm -f "$MYSQL_SOCKET"
    setsid "$mariadbd" --no-defaults --user=root --datadir="$MYSQL_DATA" \
        --socket="$MYSQL_SOCKET" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$MYSQL_PID" --log-error="$DIR/log/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 --skip-log-bin \
        </dev/null >>"$DIR/log/mariadb.log" 2>&1 &
    wait_for 60 "mariadb to answer" mysql_ok ||
        { tail_log "$DIR/log/mariadb.log"; die "mariadbd did not start"; }
    mariadb --no-defaults --socket="$MYSQL_SOCKET" -uroot -e "
        CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
        CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
        GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'localhost';
        FLUSH PRIVILEGES;" || die "could not create the MariaDB user for slurmdbd"
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster; }

start_slurmdbd() {
    if pid_alive "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null && dbd_ok >/dev/null 2>&1; then return 0; fi
    check_port "$DBD_PORT" slurmdbd
    log "starting slurmdbd (port $DBD_PORT)"
    # slurmdbd finds slurmdbd.conf next to $SLURM_CONF.
    slurmdbd >>"$DIR/log/slurmdbd.log" 2>&1 ||
        { tail_log "$DIR/log/slurmdbd.log"; die "slurmdbd failed to start"; }
    wait_for 60 "slurmdbd to answer" dbd_ok ||
        { tail_log "$DIR/log/slurmdbd.log"; die "slurmdbd does not answer on port $DBD_PORT"; }
    if ! dbd_ok 2>/dev/null | grep -qx "$CLUSTER"; then
        log "registering cluster $CLUSTER in slurmdbd"
        sacctmgr -i add cluster "$CLUSTER" >&2 || die "sacctmgr add cluster $CLUSTER failed"
    fi
}

start_slurmctld() {
    if pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null && scontrol ping >/dev/null 2>&1; then return 0; fi
    check_port "$CTLD_PORT" slurmctld
    log "starting slurmctld (port $CTLD_PORT)"
    slurmctld -f "$CONF" >>"$DIR/log/slurmctld.log" 2>&1 ||
        { tail_log "$DIR/log/slurmctld.log"; die "slurmctld failed to start"; }
    wait_for 30 "slurmctld to answer" bash -c 'scontrol ping | grep -q "is UP"' ||
        { tail_log "$DIR/log/slurmctld.log"; die "slurmctld does not answer on port $CTLD_PORT"; }
}

# The slurmd's run in a private mount namespace in which our hosts file (with n1, n2)
# is bind-mounted over /etc/hosts; their job steps inherit that namespace.
start_slurmds() {
    local n port todo=()
    for n in "${NODES[@]}"; do
        if ! pid_alive "$DIR/run/slurmd-$n.pid" slurmd >/dev/null; then
            port=$N1_PORT; [[ "$n" == n2 ]] && port=$N2_PORT
            check_port "$port" "slurmd $n"
            todo+=("$n")
        fi
    done
    ((${#todo[@]})) || return 0
    log "starting slurmd ${todo[*]} in a private mount namespace (node names in $HOSTS_FILE)"
    # shellcheck disable=SC2016
    unshare --mount --propagation private -- bash -c '
        set -e
        mount --bind "$1" /etc/hosts
        conf="$2"; logdir="$3"; shift 3
        for n in "$@"; do slurmd -f "$conf" -N "$n" >>"$logdir/slurmd-$n.log" 2>&1; done
    ' _ "$HOSTS_FILE" "$CONF" "$DIR/log" "${todo[@]}" ||
        { for n in "${todo[@]}"; do tail_log "$DIR/log/slurmd-$n.log"; done
          die "slurmd ${todo[*]} failed to start (is 'unshare --mount' allowed here?)"; }
}

nodes_idle() {
    # Both nodes respond and can run jobs (idle; or mix/alloc when jobs already run).
    [[ "$(sinfo -h -N -p low -o '%N %t' 2>/dev/null | sort -u |
        awk '$2 ~ /^(idle|mix|alloc|comp)$/' | wc -l)" == 2 ]]
}

wait_nodes_ready() {
    local i states resumed=0
    for ((i = 0; i < 300; i++)); do # 60 s
        if nodes_idle; then return 0; fi
        states="$(sinfo -h -N -p low -o '%N %t' 2>/dev/null | sort -u)"
        # A node drained/down by an earlier run (e.g. "Kill task failed"): resume it once.
        if ((i > 15 && !resumed)) && echo "$states" | grep -Eq ' (drain|drng|down|fail)'; then
            log "resuming nodes: $(echo "$states" | tr '\n' ' ')"
            scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
            resumed=1
        fi
        sleep 0.2
    done
    sinfo -N -l >&2 || true
    for n in "${NODES[@]}"; do tail_log "$DIR/log/slurmd-$n.log" 15; done
    tail_log "$DIR/log/slurmctld.log" 15
    die "nodes n1, n2 did not become idle within 60 s"
}

cluster_running() { # any of our daemons alive?
    pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null ||
        pid_alive "$DIR/run/slurmd-n1.pid" slurmd >/dev/null ||
        pid_alive "$DIR/run/slurmd-n2.pid" slurmd >/dev/null ||
        pid_alive "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null
}

# Before starting anything: every port of a daemon we still have to start must be free.
preflight_ports() {
    if [[ "$ACCOUNTING" != 0 ]]; then
        pid_alive "$MYSQL_PID" mariadbd >/dev/null || check_port "$MYSQL_PORT" mariadb
        pid_alive "$DIR/run/slurmdbd.pid" slurmdbd >/dev/null || check_port "$DBD_PORT" slurmdbd
    fi
    pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null || check_port "$CTLD_PORT" slurmctld
    pid_alive "$DIR/run/slurmd-n1.pid" slurmd >/dev/null || check_port "$N1_PORT" "slurmd n1"
    pid_alive "$DIR/run/slurmd-n2.pid" slurmd >/dev/null || check_port "$N2_PORT" "slurmd n2"
}

cmd_up() {
    require_root up
    do_install
    make_dirs
    if ! write_configs && cluster_running; then
        log "configuration changed: restarting the cluster (jobs are cancelled)"
        cmd_down
    elif cluster_running; then
        log "already running with this configuration: its daemons and jobs are kept"
    fi
    preflight_ports
    start_munge
    if [[ "$ACCOUNTING" != 0 ]]; then
        start_mariadb
        start_slurmdbd
    fi
    start_slurmctld
    start_slurmds
    wait_nodes_ready
    log "up: nodes n1 n2, partitions low (default) and high; logs in $DIR/log"
    echo "export SLURM_CONF=$CONF"
}

# ---------------------------------------------------------------- down / status

cancel_all_jobs() {
    pid_alive "$DIR/run/slurmctld.pid" slurmctld >/dev/null || return 0
    scontrol ping 2>/dev/null | grep -q "is UP" || return 0
    local jobs i
    jobs="$(squeue -h -o %A 2>/dev/null | tr '\n' ' ')"
    [[ -n "${jobs// /}" ]] || return 0
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for ((i = 0; i < 300; i++)); do # 60 s
        [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && return 0
        sleep 0.2
    done
    log "jobs still in the queue after 60 s: $(squeue -h -o '%A %T' | tr '\n' ' ')"
}

cmd_down() {
    require_root down
    [[ -d "$DIR" ]] || return 0
    cancel_all_jobs
    # Remember the slurmd's mount namespaces: whatever is still in them after the slurmd's
    # stop is an orphaned slurmstepd or job task of ours.
    local n pid ns namespaces=() self_ns
    self_ns="$(readlink /proc/self/ns/mnt)"
    for n in "${NODES[@]}"; do
        if pid="$(pid_alive "$DIR/run/slurmd-$n.pid" slurmd)"; then
            ns="$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" || continue
            [[ "$ns" == "$self_ns" ]] || namespaces+=("$ns")
        fi
    done
    stop_daemons 20 "slurmd n1:$DIR/run/slurmd-n1.pid:slurmd" "slurmd n2:$DIR/run/slurmd-n2.pid:slurmd"
    if ((${#namespaces[@]})); then
        local p
        for p in /proc/[0-9]*; do
            ns="$(readlink "$p/ns/mnt" 2>/dev/null)" || continue
            for n in "${namespaces[@]}"; do
                if [[ "$ns" == "$n" ]]; then
                    log "killing leftover process ${p#/proc/} ($(cat "$p/comm" 2>/dev/null))"
                    kill -KILL "${p#/proc/}" 2>/dev/null || true
                    break
                fi
            done
        done
    fi
    # In this order: slurmctld flushes its records to slurmdbd, which needs MariaDB.
    stop_daemons 30 "slurmctld:$DIR/run/slurmctld.pid:slurmctld"
    stop_daemons 30 "slurmdbd:$DIR/run/slurmdbd.pid:slurmdbd"
    stop_daemons 60 "mariadbd:$MYSQL_PID:mariadbd" "munged:$MUNGE_PID:munged"
}

cmd_status() {
    local up=0 pid name pidfile comm
    local -a daemons=("munged:$MUNGE_PID:munged")
    if [[ "$ACCOUNTING" != 0 ]]; then
        daemons+=("mariadbd:$MYSQL_PID:mariadbd" "slurmdbd:$DIR/run/slurmdbd.pid:slurmdbd")
    fi
    daemons+=("slurmctld:$DIR/run/slurmctld.pid:slurmctld"
        "slurmd-n1:$DIR/run/slurmd-n1.pid:slurmd" "slurmd-n2:$DIR/run/slurmd-n2.pid:slurmd")
    echo "dev cluster in $DIR (SLURM_CONF=$CONF)"
    for d in "${daemons[@]}"; do
        IFS=: read -r name pidfile comm <<<"$d"
        if pid="$(pid_alive "$pidfile" "$comm")"; then
            printf '  %-10s running (pid %s)\n' "$name" "$pid"
        else
            printf '  %-10s NOT running\n' "$name"
            up=1
        fi
    done
    if [[ -e "$CONF" ]] && command -v sinfo >/dev/null 2>&1; then
        echo "--- sinfo"
        sinfo 2>&1 || up=1
        echo "--- squeue"
        squeue 2>&1 || up=1
    else
        up=1
    fi
    return "$up"
}

main() {
    local verb="${1:-}"
    shift || true
    case "$verb" in
    up) cmd_up ;;
    down)
        cmd_down
        if [[ "${1:-}" == --purge ]]; then
            [[ -n "$DIR" && "$DIR" != / ]] || die "refusing to purge '$DIR'"
            log "removing $DIR"
            rm -rf "$DIR"
        fi
        ;;
    status) cmd_status ;;
    install) require_root install; do_install ;;
    *)
        echo "usage: $0 up | down [--purge] | status | install" >&2
        exit 2
        ;;
    esac
}

main "$@"
