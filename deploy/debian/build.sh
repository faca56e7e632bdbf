#!/usr/bin/env bash
# Build the Debian package from this checkout: dist/fastagi-screen_<version>-1_<arch>.deb.
#
#   deploy/debian/build.sh [OUTPUT_DIR]
#
# Why a dpkg-deb script and not dpkg-buildpackage: the service runs in a virtual environment
# under /opt/fastagi-screen made with Debian's own /usr/bin/python3.X and the pinned wheels of
# requirements.txt: Debian 12 has no pyst2 and older redis (4.3), fakeredis (1.9), uvloop
# (0.17) and prometheus-client (0.16) than pyproject.toml needs. That is one pip install, not a
# debhelper build. Needs dpkg-dev, python3-venv and an index with those
# wheels (PyPI or a mirror, as pip is configured). It touches nothing outside a temporary
# directory and OUTPUT_DIR: the venv is made in a staging tree and its paths rewritten.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=$(mkdir -p "${1:-$root/dist}" && cd "${1:-$root/dist}" && pwd)
prefix=/opt/fastagi-screen

# the interpreter the package depends on (python3.11 on Debian 12, python3.13 on Debian 13)
pyver=$(/usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
python=/usr/bin/python$pyver
upstream=$("$python" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"]["version"])' "$root/pyproject.toml")
version=$upstream-1
arch=$(dpkg --print-architecture)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
stage=$work/stage
venv=$stage$prefix

# 1. the virtual environment: pinned dependencies, then the project, built from a copy so the
#    checkout gets no build/ or egg-info; no pip left inside (nobody installs into it by hand)
"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install -q --require-virtualenv --no-cache-dir --no-compile --use-pep517)
"${pip[@]}" -r "$here/requirements.txt"
mkdir "$work/src"
tar -C "$root" --exclude=__pycache__ -cf - pyproject.toml README.md fastagi | tar -C "$work/src" -xf -
"${pip[@]}" --no-deps "$work/src"
"$venv/bin/python" -m pip check >/dev/null
"$venv/bin/python" -m pip uninstall -q -y pip setuptools
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1 "$venv"/lib/python*/site-packages/*/direct_url.json
find "$venv" -name '*.so' -exec strip --strip-unneeded {} +

# 2. the staging path out of every text file (script shebangs, pyvenv.cfg, RECORDs), then
#    byte-code compiled as it will be found (read-only /opt under ProtectSystem=strict)
grep -rlIF "$stage" "$venv" | xargs -r sed -i "s|$stage||g"
"$venv/bin/python" -m compileall -q -f -j0 -s "$stage" -p / "$venv/lib" >/dev/null

# 3. the rest of the file system
install -d "$stage/usr/bin" "$stage/usr/lib/systemd/system" "$stage/etc/fastagi" \
    "$stage/usr/share/doc/fastagi-screen/examples"
ln -s "$prefix/bin/fastagi-ctl" "$stage/usr/bin/fastagi-ctl"
install -m 0644 "$root"/deploy/systemd/*.service "$stage/usr/lib/systemd/system/"
install -m 0644 "$root/deploy/fastagi.toml" "$stage/etc/fastagi/fastagi.toml"
install -m 0644 "$root/README.md" "$here/copyright" "$stage/usr/share/doc/fastagi-screen/"
cp -r "$root/deploy/fail2ban" "$root/deploy/asterisk" "$root/dialplan" \
    "$stage/usr/share/doc/fastagi-screen/examples/"
install -m 0644 "$root/deploy/README.md" "$stage/usr/share/doc/fastagi-screen/examples/README.md"
find "$stage/usr/share/doc" -type d -exec chmod 0755 {} + -o -type f -exec chmod 0644 {} +

# 4. the control area
install -d "$stage/DEBIAN"
install -m 0755 "$here/postinst" "$here/prerm" "$here/postrm" "$stage/DEBIAN/"
echo /etc/fastagi/fastagi.toml >"$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@PYTHON@/python$pyver/" \
    -e "s/@SIZE@/$size/" "$here/control.in" >"$stage/DEBIAN/control"

deb="$out/fastagi-screen_${version}_$arch.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
