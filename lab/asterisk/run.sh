#!/usr/bin/env bash
# The whole lab in one command: build Asterisk 22.10.1 (PJSIP) and 20.20.1 (chan_sip +
# PJSIP) from the git trees you give (once; kept in WORK), then run lab.py and cluster.py
# (three PBXs sharing one Redis) on each.
#
#   sudo lab/asterisk/run.sh ASTERISK_GIT PJPROJECT_GIT WORK [VERSION ...]
#
# Prints the pass/fail tables per version; exit 0 when every check of every version passed.
set -euo pipefail
AGIT=${1:?usage: run.sh ASTERISK_GIT PJPROJECT_GIT WORK [VERSION ...]}; PGIT=${2:?}; WORK=${3:?}
shift 3
VERSIONS=("$@"); [ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(22.10.1 20.20.1)
HERE=$(cd "$(dirname "$0")" && pwd); ROOT=$(cd "$HERE/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
mkdir -p "$WORK"; WORK=$(realpath "$WORK")
status=0
for version in "${VERSIONS[@]}"; do
    prefix=$WORK/asterisk-$version
    if [ ! -x "$prefix/inst/sbin/asterisk" ]; then
        echo "building Asterisk $version into $prefix (about 6-8 minutes)..."
        "$HERE/build.sh" "$version" "$AGIT" "$PGIT" "$prefix"
    fi
    run=$WORK/run-$version-$(date +%Y%m%d-%H%M%S)
    "$PY" "$HERE/lab.py" --asterisk "$prefix/inst" --work "$run" || status=1
    echo "(configs and logs: $run)"; echo
    "$PY" "$HERE/cluster.py" --asterisk "$prefix/inst" --work "$run-cluster" || status=1
    echo "(configs and logs: $run-cluster)"; echo
done
exit $status
