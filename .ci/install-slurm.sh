#!/usr/bin/env bash
# CI step: install the Debian packages for the real Slurm dev cluster (slurm-wlm, munge,
# slurmdbd, mariadb-server), without starting their system services, then start the
# cluster once so later steps only reuse it. Run as root (or via sudo).
#   DEV_CLUSTER_ACCOUNTING=0 skips slurmdbd/MariaDB (not recommended: sacct stops working).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
slurm/dev-cluster.sh install
slurm/dev-cluster.sh up | tail -1
