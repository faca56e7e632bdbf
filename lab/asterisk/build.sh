#!/usr/bin/env bash
# Build Asterisk from a git tree the caller provides, into PREFIX (nothing is downloaded).
#
#   lab/asterisk/build.sh VERSION ASTERISK_GIT PJPROJECT_GIT PREFIX
#
# VERSION       a tag of asterisk/asterisk: 22.10.1 (PJSIP only) or 20.20.1 (chan_sip + PJSIP)
# ASTERISK_GIT  a (bare) git directory of asterisk/asterisk holding that tag
# PJPROJECT_GIT a (bare) git directory of pjsip/pjproject holding the tag Asterisk names in
#               third-party/versions.mak (2.17 for 20.20.1 and 22.10.1): Asterisk's bundled
#               PJSIP build wants a release tarball, so we make one from the tag
# PREFIX        where it goes: PREFIX/src, PREFIX/inst (sbin/asterisk), build logs
#
# A lean module set (what the lab uses), make -j2 at nice 19: ~6-8 minutes on 2 cores.
set -euo pipefail
VERSION=${1:?usage: build.sh VERSION ASTERISK_GIT PJPROJECT_GIT PREFIX}
AGIT=${2:?asterisk git dir}; PGIT=${3:?pjproject git dir}; PREFIX=${4:?prefix}
mkdir -p "$PREFIX/cache"; PREFIX=$(realpath "$PREFIX")
SRC=$PREFIX/src
if [ ! -f "$SRC/configure" ]; then
    mkdir -p "$SRC"
    # some mirrors lack a blob under ChangeLogs/, which the build does not need
    mapfile -t top < <(git --git-dir="$AGIT" ls-tree --name-only "$VERSION" | grep -vx ChangeLogs)
    # (git still names that blob on stderr, harmlessly: hide that one line)
    git --git-dir="$AGIT" archive "$VERSION" -- "${top[@]}" 2> >(grep -v "for 'ChangeLogs/" >&2) |
        tar -x -C "$SRC"
fi
cd "$SRC"
PJ=$(sed -n 's/^PJPROJECT_VERSION=//p' third-party/versions.mak)
TARBALL=$PREFIX/cache/pjproject-$PJ.tar.bz2
[ -f "$TARBALL" ] || git --git-dir="$PGIT" archive --prefix="pjproject-$PJ/" "$PJ" | bzip2 -1 > "$TARBALL"
# our tarball is built from the tag, not the release file: record its own checksum
(cd "$PREFIX/cache" && md5sum "pjproject-$PJ.tar.bz2") > "third-party/pjproject/pjproject-$PJ.tar.bz2.md5"

nice -n 19 ./configure --prefix="$PREFIX/inst" --with-pjproject-bundled \
    --with-externals-cache="$PREFIX/cache" --without-libjwt >"$PREFIX/configure.log" 2>&1
nice -n 19 make menuselect.makeopts >/dev/null
sel() { menuselect/menuselect "$@" menuselect.makeopts >/dev/null; }
for category in APPS BRIDGES CDR CEL CHANNELS CODECS FORMATS FUNCS PBX RES TESTS UTILS \
                CORE_SOUNDS MOH EXTRA_SOUNDS; do
    sel --disable-category "MENUSELECT_$category" || true
done
modules=(
    app_verbose app_exec app_stack app_echo func_channel func_strings func_logic func_cut
    func_callerid func_math pbx_config res_agi res_speech res_crypto res_rtp_asterisk
    res_security_log res_timing_timerfd res_sorcery_astdb res_sorcery_config
    res_sorcery_memory res_sorcery_memory_cache codec_ulaw codec_alaw format_pcm
    bridge_simple bridge_builtin_features chan_pjsip res_pjproject res_pjsip res_pjsip_session
    res_pjsip_pubsub res_pjsip_sdp_rtp res_pjsip_endpoint_identifier_anonymous
    res_pjsip_endpoint_identifier_ip res_pjsip_endpoint_identifier_user
    res_pjsip_authenticator_digest res_pjsip_registrar res_pjsip_caller_id res_pjsip_nat
    res_pjsip_acl res_http_websocket func_pjsip_endpoint
    app_dial res_clioriginate func_uri   # the Local-channel caller-ID check (lab.py)
)
case "$VERSION" in 2[01].*) modules+=(chan_sip) ;; esac   # removed in Asterisk 21
for module in "${modules[@]}"; do sel --enable "$module" || echo "build.sh: no module $module"; done
sel --disable BUILD_NATIVE || true
nice -n 19 make -j2 >"$PREFIX/make.log" 2>&1 || { tail -30 "$PREFIX/make.log"; exit 1; }
nice -n 19 make install >"$PREFIX/install.log" 2>&1 || { tail -30 "$PREFIX/install.log"; exit 1; }
"$PREFIX/inst/sbin/asterisk" -V
