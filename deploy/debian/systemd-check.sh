#!/usr/bin/env bash
# Try a built package under a real systemd, on a machine without one (CI, a container):
#
#   deploy/debian/systemd-check.sh dist/fastagi-screen_*.deb
#
# Boots this machine's own / as a container (systemd-nspawn, package systemd-container) on a
# copy-on-write overlay whose changes live in memory and vanish at exit, so the machine itself
# is never changed. Inside, as an admin would: apt install, nothing enabled or started, then
# `systemctl enable --now fastagi-screen`, `fastagi-ctl check`, bans that survive a restart,
# the agent's exit 2 on the embedded store not restarted; then both units from the one config
# on a shared Redis (redis-server) with the nftables backend, each with its own /metrics; an
# upgrade (a reinstall) restarting them and keeping the config; purge, which also removes our
# nftables table. Prints the transcript; exit 0 only when every step
# passed. Needs root, overlayfs, systemd-container, redis-server and nftables; about 30 s.
set -euo pipefail

deb=$(readlink -f "$1")
[ -f "$deb" ] || { echo "no such package: $1" >&2; exit 2; }
here=$(mktemp -d)
trap 'rm -rf "$here"' EXIT

# the admin's steps, run by a unit of the booted container; `set -e`: the first failure ends it
mkdir "$here/files" "$here/ovl"
cat >"$here/files/inside.sh" <<'EOF'
set -exo pipefail
trap 'journalctl --no-pager -n 40' ERR  # what systemd saw, for the transcript
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends /srv/fastagi-check/*.deb
[ "$(systemctl is-enabled fastagi-screen)" = disabled ]
[ "$(systemctl is-enabled fastagi-agent)" = disabled ]
! systemctl is-active fastagi-screen fastagi-agent
systemctl enable --now fastagi-screen
for _ in $(seq 100); do [ -S /run/fastagi/embedded.sock ] && break; sleep 0.1; done
systemctl is-active fastagi-screen
[ "$(stat -c %U /var/lib/fastagi /run/fastagi)" = "fastagi
fastagi" ]
fastagi-ctl check
fastagi-ctl simulate --ip 203.0.113.9 --calls 5 | grep -q SCREEN_RESULT=BANNED
systemctl restart fastagi-screen
for _ in $(seq 100); do fastagi-ctl status 203.0.113.9 >/dev/null 2>&1 && break; sleep 0.1; done
fastagi-ctl status 203.0.113.9 | grep -q 'Banned until'
# the agent needs a shared Redis: on the packaged (embedded) config it stops with exit 2, once
! systemctl start fastagi-agent
sleep 3
[ "$(systemctl show -p NRestarts --value fastagi-agent)" = 0 ]
journalctl -u fastagi-agent --no-pager | grep -q 'agent needs a shared Redis'
# a PBX of a cluster: both units from the one config on a shared Redis, the agent applying
# bans to nftables as the user fastagi, each role on its own /metrics address
systemd-run --unit=check-redis /usr/bin/redis-server --bind 127.0.0.1 --port 6379 --save ''
for _ in $(seq 100); do redis-cli ping 2>/dev/null | grep -q PONG && break; sleep 0.1; done
sed -i -e 's|^url = "memory://"|url = "redis://127.0.0.1:6379/0"|' \
    -e 's|^backend = "dry-run"|backend = "nftables"|' \
    -e 's|^listen = ""|listen = "127.0.0.1:9573"|' \
    -e 's|^agent_listen = ""|agent_listen = "127.0.0.1:9574"|' /etc/fastagi/fastagi.toml
systemctl restart fastagi-screen
systemctl reset-failed fastagi-agent
systemctl enable --now fastagi-agent
fastagi-ctl ban 203.0.113.77
for _ in $(seq 100); do nft list set inet fastagi ban4 2>/dev/null | grep -q 203.0.113.77 && break; sleep 0.1; done
nft list set inet fastagi ban4 | grep -q 203.0.113.77
get() { python3 -c "import urllib.request as u; print(u.urlopen('http://127.0.0.1:$1').read().decode())"; }
get 9573/metrics | grep -c '^fastagi_bans_issued_total'
get 9574/metrics | grep -c '^fastagi_firewall_set_size{backend="nftables"'
get 9573/ | grep -c '203\.0\.113\.77'  # the status page, on serve's listener only
systemctl is-active fastagi-screen fastagi-agent
for unit in fastagi-screen fastagi-agent; do [ "$(systemctl show -p NRestarts --value $unit)" = 0 ]; done
# an upgrade (here: the same version again) keeps the edited config and the bans, and
# restarts the running units on the new files
pids=$(systemctl show -p MainPID --value fastagi-screen fastagi-agent)
apt-get install -y -q --reinstall /srv/fastagi-check/*.deb
grep -q '^agent_listen = "127.0.0.1:9574"' /etc/fastagi/fastagi.toml
[ "$(systemctl show -p MainPID --value fastagi-screen fastagi-agent)" != "$pids" ]
systemctl is-active fastagi-screen fastagi-agent
for _ in $(seq 100); do nft list set inet fastagi ban4 2>/dev/null | grep -q 203.0.113.77 && break; sleep 0.1; done
nft list set inet fastagi ban4 | grep -q 203.0.113.77
apt-get purge -y -q fastagi-screen
! nft list table inet fastagi  # prerm's teardown: our table is gone with the program
! id fastagi
[ ! -e /etc/fastagi ] && [ ! -e /var/lib/fastagi ] && [ ! -e /opt/fastagi-screen ]
[ -z "$(find /etc/systemd/system -name 'fastagi-*')" ]
echo "SYSTEMD CHECK PASSED"
EOF

# only journald and this check start in the container: a target of its own
cat >"$here/files/pkg-check.target" <<'EOF'
[Unit]
Description=fastagi-screen package check
Requires=basic.target pkg-check.service
After=basic.target pkg-check.service
AllowIsolate=yes
EOF
cat >"$here/files/pkg-check.service" <<'EOF'
[Unit]
After=basic.target
[Service]
Type=oneshot
ExecStart=/bin/bash /srv/fastagi-check/inside.sh
StandardOutput=file:/srv/fastagi-check/transcript
StandardError=file:/srv/fastagi-check/transcript
ExecStopPost=/bin/systemctl --no-block poweroff
EOF

export here deb
unshare -m --propagation private bash -c '
    set -e
    ovl=$here/ovl
    mount -t tmpfs tmpfs "$ovl"
    mkdir -p "$ovl/upper" "$ovl/work" "$ovl/root"
    mount -t overlay overlay -o "lowerdir=/,upperdir=$ovl/upper,workdir=$ovl/work" "$ovl/root"
    # nspawn cleans this directory up and refuses to on a disk file system
    mkdir -p /run/systemd/nspawn && mount -t tmpfs tmpfs /run/systemd/nspawn
    root=$ovl/root
    mkdir -p "$root/srv/fastagi-check"
    cp "$deb" "$here/files/inside.sh" "$root/srv/fastagi-check/"
    cp "$here"/files/pkg-check.* "$root/etc/systemd/system/"
    timeout 180 systemd-nspawn -q -D "$root" --private-network --link-journal=no \
        --register=no --keep-unit -b systemd.unit=pkg-check.target >"$here/boot.log" 2>&1 || true
    cat "$root/srv/fastagi-check/transcript" 2>/dev/null ||
        { echo "no transcript: the container did not boot"; tail -20 "$here/boot.log"; }
' >"$here/log" 2>&1 || true
cat "$here/log"
grep -q '^SYSTEMD CHECK PASSED$' "$here/log"
