#!/usr/bin/env bash
# Build a Linux + perf guest for `vmm`:
#   out/vmlinux           Linux 6.1 built from Debian's linux-source-6.1 with
#                         kernel/config and kernel/patches (ELF)
#   out/bzImage           the same kernel as a bzImage
#   out/cmdline           the kernel parameters the guest needs on the
#                         development hosts (kernel/cmdline)
#   out/initramfs.cpio    uncompressed: busybox, /init, /bin/busy,
#                         /bin/perf-checks, perf and its libraries
# plus out/config (the kernel's), out/rootfs/ (the initramfs tree)
# and out/manifest.txt (packages, versions, checksums).
#
# Needs a Debian 12 (bookworm) host with apt; installs the tools it needs
# (cpio, binutils, make, flex, bison, libelf-dev ...) with apt-get when they
# are missing. Downloads go to cache/ (154 MiB the first time), the
# kernel's source and object trees too (incremental: seconds after a patch
# changes one file), so later runs are offline and fast; when the outputs
# are up to date (same packages, same scripts, config and patches) it does
# nothing. See README.md beside it.
#
# Exit codes: 0 built (or up to date), 1 failed, 2 bad arguments.
set -eEuo pipefail
trap '[[ $BASHPID != "$$" ]] || printf "build.sh: error: command failed (line %s): %s\n" "$LINENO" "$BASH_COMMAND" >&2' ERR

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
OUT="$HERE/out"
CACHE="${LINUX_GUEST_CACHE:-$HERE/cache}"
FORCE=0
FULL_PERF=0
# Bound on any single network operation (apt-get update/download/install).
NET_TIMEOUT="${NET_TIMEOUT:-900}"
KSRC_PKG=linux-source-6.1
MULTIARCH=x86_64-linux-gnu

usage() {
    cat <<EOF
usage: $0 [--out DIR] [--cache DIR] [--force] [--full-perf]

Builds a Linux + perf guest (kernel from source + initramfs) from Debian
packages.
  --out DIR    where the outputs go (default: $HERE/out)
  --cache DIR  where downloads are kept (default: $HERE/cache,
               or \$LINUX_GUEST_CACHE)
  --force      rebuild even if the outputs are up to date
  --full-perf  keep perf's Python, Perl and S-Lang libraries (perf script
               with scripts, the TUI); by default they are stubs, which
               makes the initramfs 13 MB smaller and perf start faster
Environment: NET_TIMEOUT (seconds per network step, default 900).
EOF
}

log() { printf 'build.sh: %s\n' "$*" >&2; }
die() {
    printf 'build.sh: error: %s\n' "$*" >&2
    exit 1
}

ORIG_ARGS=("$@")
exec 8>&1 # the real stdout, for a restart from inside a redirection
while (($#)); do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; OUT=$2; shift 2 ;;
        --out=*) OUT=${1#--out=}; shift ;;
        --cache) [[ $# -ge 2 ]] || { usage >&2; exit 2; }; CACHE=$2; shift 2 ;;
        --cache=*) CACHE=${1#--cache=}; shift ;;
        --force) FORCE=1; shift ;;
        --full-perf) FULL_PERF=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'build.sh: unknown argument: %s\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
done

START=$SECONDS
mkdir -p "$OUT" "$CACHE/debs" "$CACHE/extract"
OUT=$(cd -- "$OUT" && pwd)
CACHE=$(cd -- "$CACHE" && pwd)
LOGDIR="$CACHE/logs"
mkdir -p "$LOGDIR"

[[ "$(uname -m)" == x86_64 ]] || die "this builds an x86-64 guest; run it on an x86-64 host"
for tool in apt-get apt-cache dpkg-deb; do
    command -v "$tool" >/dev/null || die "$tool is required (this script needs a Debian 12 host)"
done

# One build at a time per cache (tests may start several).
exec 9>"$CACHE/.lock"
if command -v flock >/dev/null; then
    flock -w "$NET_TIMEOUT" 9 || die "another build.sh holds $CACHE/.lock for more than ${NET_TIMEOUT}s"
fi

# ---------------------------------------------------------------- apt ------
APT_OPTS=(-q -o Acquire::Retries=3 -o Acquire::http::Timeout=60 -o Acquire::https::Timeout=60)
if [[ $EUID -eq 0 ]]; then
    # apt-get download as root into a directory _apt cannot read otherwise warns.
    APT_OPTS+=(-o APT::Sandbox::User=root)
fi
export DEBIAN_FRONTEND=noninteractive
APT_UPDATED=0

apt_update() {
    ((APT_UPDATED)) && return 1
    APT_UPDATED=1
    [[ $EUID -eq 0 ]] || die "the package lists need 'apt-get update', which needs root"
    log "running apt-get update (package lists missing or stale)"
    timeout "$NET_TIMEOUT" apt-get "${APT_OPTS[@]}" update >"$LOGDIR/apt-update.log" 2>&1 ||
        die "apt-get update failed (log: $LOGDIR/apt-update.log): $(tail -n 3 "$LOGDIR/apt-update.log")"
}

# apt_install PKG...: install host tools.
apt_install() {
    [[ $EUID -eq 0 ]] || die "missing tools ($*): install them or run as root"
    log "installing host tools: $*"
    local try
    for try in 1 2; do
        if timeout "$NET_TIMEOUT" apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "$@" \
            >"$LOGDIR/apt-install.log" 2>&1; then
            return 0
        fi
        [[ $try -eq 1 ]] && apt_update && continue
        break
    done
    die "apt-get install $* failed (log: $LOGDIR/apt-install.log): $(tail -n 3 "$LOGDIR/apt-install.log")"
}

# need CMD:PKG...: make sure each command exists, installing its package.
need() {
    local spec missing=()
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null || missing+=("${spec#*:}")
    done
    ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
    for spec in "$@"; do
        command -v "${spec%%:*}" >/dev/null || die "'${spec%%:*}' still missing after installing ${spec#*:}"
    done
}

need cpio:cpio readelf:binutils sha256sum:coreutils timeout:coreutils \
    find:findutils awk:mawk od:coreutils base64:coreutils xz:xz-utils patch:patch \
    make:make gcc:gcc flex:flex bison:bison bc:bc
# Headers and archives that are not commands: objtool needs libelf; the
# guest's busy workload is linked statically against glibc.
[[ -f /usr/include/gelf.h ]] || apt_install libelf-dev
[[ -f /usr/lib/$MULTIARCH/libc.a ]] || apt_install libc6-dev

# resolve PKG...: print "PKG VERSION" for every package that has a
# downloadable version: apt's candidate if a repository has it, else the
# highest version a repository has (an installed newer version, as on some
# hosts, cannot be downloaded). Packages without one are left out.
resolve() {
    local pol mad
    pol=$(apt-cache policy "$@" 2>/dev/null || true)
    mad=$(apt-cache madison "$@" 2>/dev/null || true)
    awk -v pol="$pol" -v mad="$mad" -v want="$*" '
        function trim(s) { gsub(/^[ \t]+|[ \t]+$/, "", s); return s }
        BEGIN {
            n = split(mad, ml, "\n")
            for (i = 1; i <= n; i++) {
                if (split(ml[i], f, "|") < 3) continue
                src = trim(f[3]); if (src !~ /Packages$/) continue
                p = trim(f[1]); v = trim(f[2])
                ok[p, v] = 1
                if (!(p in first)) first[p] = v
            }
            n = split(pol, pl, "\n")
            for (i = 1; i <= n; i++) {
                if (pl[i] ~ /^[^ ].*:$/) { cur = pl[i]; sub(/:$/, "", cur) }
                else if (pl[i] ~ /^  Candidate:/) { c = pl[i]; sub(/^  Candidate:[ ]*/, "", c); cand[cur] = c }
            }
            n = split(want, w, " ")
            for (i = 1; i <= n; i++) {
                p = w[i]
                if ((p in cand) && ((p, cand[p]) in ok)) print p, cand[p]
                else if (p in first) print p, first[p]
            }
        }'
}

# resolve_one PKG: the version resolve() picks, updating the lists once if
# apt knows no downloadable version.
resolve_one() {
    local v
    v=$(resolve "$1" | awk '{print $2}')
    if [[ -z $v ]] && apt_update; then
        v=$(resolve "$1" | awk '{print $2}')
    fi
    [[ -n $v ]] || die "apt knows no downloadable version of '$1' (is this Debian 12 with its main archive in sources.list?)"
    printf '%s\n' "$v"
}

# is_downloadable PKG VERSION
is_downloadable() {
    apt-cache madison "$1" 2>/dev/null | awk -F'|' -v v="$2" '
        { gsub(/ /, "", $2) } $2 == v && $3 ~ /Packages[ ]*$/ { f = 1 } END { exit !f }'
}

# depends PKG=VER...: print the packages each one Depends/Pre-Depends on (the
# first alternative of each), one per line, without versions or arch tags.
depends() {
    apt-cache show "$@" 2>/dev/null | awk '
        /^(Depends|Pre-Depends):/ {
            sub(/^[A-Za-z-]+:[ ]*/, "")
            n = split($0, d, ",")
            for (i = 1; i <= n; i++) {
                a = d[i]; sub(/\|.*/, "", a); sub(/\(.*/, "", a)
                gsub(/[ \t]/, "", a); sub(/:.*/, "", a)
                if (a != "") print a
            }
        }' | sort -u
}

# fetch PKG=VER...: make sure the .deb files are in the cache, verified
# against the archive's SHA256; print their paths ("PKG PATH" lines).
fetch() {
    local uris try
    for try in 1 2; do
        if uris=$(apt-get "${APT_OPTS[@]}" download --print-uris "$@" 2>"$LOGDIR/print-uris.log"); then
            break
        fi
        [[ $try -eq 1 ]] && apt_update && continue
        die "apt cannot locate $* (log: $LOGDIR/print-uris.log): $(tail -n 2 "$LOGDIR/print-uris.log")"
    done
    local missing=() line file size sum pkgname
    local -A want_sum=()
    while read -r line; do
        [[ -n $line ]] || continue
        # 'URI' FILE SIZE SHA256:HEX
        read -r _ file size sum <<<"$line"
        want_sum[$file]=${sum#*:}
        if [[ -f "$CACHE/debs/$file" ]] &&
            [[ "$(stat -c %s "$CACHE/debs/$file")" == "$size" ]]; then
            continue
        fi
        missing+=("$file")
    done <<<"$uris"
    if ((${#missing[@]})); then
        local specs=() f
        for f in "${missing[@]}"; do
            # file name: NAME_VERSION_ARCH.deb with the epoch ':' as %3a
            pkgname=${f%%_*}
            local ver=${f#*_}
            ver=${ver%_*}
            ver=${ver//%3a/:}
            specs+=("$pkgname=$ver")
        done
        log "downloading ${#specs[@]} package(s): ${specs[*]}"
        if ! (cd "$CACHE/debs" && timeout "$NET_TIMEOUT" apt-get "${APT_OPTS[@]}" download "${specs[@]}") \
            >"$LOGDIR/download.log" 2>&1; then
            # Stale lists name versions the archive no longer has: update
            # them and start again (versions may change), once.
            if [[ -z ${BUILD_SH_RESTARTED:-} ]] && apt_update; then
                log "download failed; starting again with fresh package lists"
                export BUILD_SH_RESTARTED=1
                exec 9>&-
                exec "$HERE/build.sh" "${ORIG_ARGS[@]}" >&8
            fi
            die "apt-get download failed (log: $LOGDIR/download.log): $(tail -n 3 "$LOGDIR/download.log")"
        fi
        DOWNLOADED+=("${missing[@]}")
    fi
    for file in "${!want_sum[@]}"; do
        [[ -f "$CACHE/debs/$file" ]] || die "download of $file produced no file"
        if [[ "${want_sum[$file]}" =~ ^[0-9a-f]{64}$ ]]; then
            sum=$(sha256sum "$CACHE/debs/$file" | awk '{print $1}')
            if [[ "$sum" != "${want_sum[$file]}" ]]; then
                rm -f "$CACHE/debs/$file"
                die "$file: SHA256 mismatch (removed from the cache; run again)"
            fi
        fi
        printf '%s %s\n' "${file%%_*}" "$CACHE/debs/$file"
    done
}

# extract DEB [MEMBER...]: unpack (cached) and print the tree's path.
extract() {
    local deb=$1
    shift
    local name dir
    name=$(basename "$deb" .deb)
    if (($#)); then name="$name.partial"; fi
    dir="$CACHE/extract/$name"
    if [[ ! -f "$dir/.done" ]]; then
        rm -rf "$dir"
        mkdir -p "$dir"
        if (($#)); then
            dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir" "$@" ||
                die "cannot unpack $* from $deb"
        else
            dpkg-deb -x "$deb" "$dir" || die "cannot unpack $deb"
        fi
        touch "$dir/.done"
    fi
    printf '%s\n' "$dir"
}

# ---------------------------------------------- which packages ----------
log "resolving packages"
KSRC_VER=$(resolve_one "$KSRC_PKG")
BB_VER=$(resolve_one busybox-static)
# perf from the same kernel source version as the kernel, when available.
if is_downloadable linux-perf "$KSRC_VER"; then PERF_VER=$KSRC_VER; else PERF_VER=$(resolve_one linux-perf); fi
log "kernel source $KSRC_PKG $KSRC_VER, busybox-static $BB_VER, linux-perf $PERF_VER"

KPATCHES=("$HERE"/kernel/patches/*.patch)
SCRIPT_SUM=$(cat "$HERE/build.sh" "$HERE/init" "$HERE/busy.c" "$HERE/perf-checks" \
    "$HERE/kernel/config" "$HERE/kernel/cmdline" "${KPATCHES[@]}" <(echo "full-perf=$FULL_PERF") |
    sha256sum | awk '{print $1}')
STAMP="$OUT/.inputs"
OUTPUTS=("$OUT/vmlinux" "$OUT/bzImage" "$OUT/initramfs.cpio" "$OUT/cmdline")

up_to_date() {
    [[ -f $STAMP ]] || return 1
    local f
    for f in "${OUTPUTS[@]}"; do [[ -s $f ]] || return 1; done
    grep -qx "script $SCRIPT_SUM" "$STAMP" || return 1
    grep -qx "top $KSRC_PKG=$KSRC_VER busybox-static=$BB_VER linux-perf=$PERF_VER" "$STAMP" || return 1
    # The library packages perf's libraries came from: same versions still?
    local libs now
    libs=$(awk '$1 == "lib" {print $2}' "$STAMP" | cut -d= -f1)
    [[ -n $libs ]] || return 1
    # shellcheck disable=SC2086 # word splitting of package names intended
    now=$(resolve $libs | awk '{printf "lib %s=%s\n", $1, $2}' | sort)
    [[ "$now" == "$(grep '^lib ' "$STAMP" | sort)" ]] || return 1
}

print_outputs() {
    local f
    log "outputs in $OUT:"
    for f in "${OUTPUTS[@]}"; do
        printf '  %-48s %s\n' "$f" "$(du -h "$f" | cut -f1)"
    done
    printf '  %-48s (the initramfs tree)\n' "$OUT/rootfs/"
    printf 'boot it with:\n  vmm run --kernel %s --initrd %s --memory 512 --cmdline "$(cat %s)"\n' \
        "$OUT/vmlinux" "$OUT/initramfs.cpio" "$OUT/cmdline"
}

if ((!FORCE)) && up_to_date; then
    log "up to date (packages and scripts unchanged; --force rebuilds)"
    print_outputs
    exit 0
fi

DOWNLOADED=()
WORK="$OUT/.work"
rm -rf "$WORK"
mkdir -p "$WORK"
trap 'rm -rf "$WORK"' EXIT

declare -A DEB=()
fetch "$KSRC_PKG=$KSRC_VER" "busybox-static=$BB_VER" "linux-perf=$PERF_VER" >"$WORK/fetched"
while read -r p path; do DEB[$p]=$path; done <"$WORK/fetched"

# ------------------------------------------------------------ kernel -------
# Linux from Debian's linux-source package, patched for the development
# hosts' limits (kernel/patches, each inert without its boot parameter) and
# configured small (kernel/config over tinyconfig). The source tree and the
# object tree stay in the cache, so a changed patch rebuilds in seconds.
KDIR="$CACHE/kernel"
KSRC="$KDIR/src"
KOBJ="$KDIR/obj"
mkdir -p "$KDIR" "$KOBJ"

# patched_files PATCH...: the files the patches change.
patched_files() {
    sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$@" | sort -u
}

KTREE_ID="$KSRC_VER $(cat "${KPATCHES[@]}" | sha256sum | awk '{print $1}')"
if [[ ! -f "$KSRC/.vmm-tree" || "$(cat "$KSRC/.vmm-tree")" != "$KTREE_ID" ]]; then
    log "unpacking $KSRC_PKG $KSRC_VER and applying ${#KPATCHES[@]} patch(es)"
    TOUCH=()
    [[ -f "$KSRC/.vmm-patched" ]] && mapfile -t TOUCH <"$KSRC/.vmm-patched"
    rm -rf "$KSRC"
    mkdir -p "$KSRC"
    dpkg-deb --fsys-tarfile "${DEB[$KSRC_PKG]}" | tar -xO "./usr/src/$KSRC_PKG.tar.xz" |
        xz -dc -T0 | tar -x -C "$KSRC" --strip-components=1 ||
        die "cannot unpack the kernel source from ${DEB[$KSRC_PKG]}"
    for p in "${KPATCHES[@]}"; do
        patch -p1 -s -d "$KSRC" --no-backup-if-mismatch <"$p" >"$LOGDIR/patch.log" 2>&1 ||
            die "kernel patch ${p##*/} does not apply to $KSRC_PKG $KSRC_VER: $(tail -n 3 "$LOGDIR/patch.log")"
    done
    mapfile -t -O "${#TOUCH[@]}" TOUCH < <(patched_files "${KPATCHES[@]}")
    # Files patched now or before are newer than objects built from another
    # version of them (the package's files keep their old dates).
    for f in "${TOUCH[@]}"; do [[ -f "$KSRC/$f" ]] && touch "$KSRC/$f"; done
    patched_files "${KPATCHES[@]}" >"$KSRC/.vmm-patched"
    printf '%s\n' "$KTREE_ID" >"$KSRC/.vmm-tree"
fi

export KBUILD_BUILD_USER=vmm KBUILD_BUILD_HOST=vmm KBUILD_BUILD_TIMESTAMP="$KSRC_VER"
kmake() { make -C "$KSRC" O="$KOBJ" "$@" >>"$LOGDIR/kernel.log" 2>&1; }
: >"$LOGDIR/kernel.log"
log "configuring the kernel (tinyconfig + kernel/config)"
kmake tinyconfig || die "make tinyconfig failed (log: $LOGDIR/kernel.log)"
"$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KOBJ" "$KOBJ/.config" "$HERE/kernel/config" \
    >>"$LOGDIR/kernel.log" 2>&1 || die "merging kernel/config failed (log: $LOGDIR/kernel.log)"
kmake olddefconfig || die "make olddefconfig failed (log: $LOGDIR/kernel.log)"
# Every line of the fragment must have been taken as written.
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF -- "$line" "$KOBJ/.config" || die "kernel config did not take '$line'" ;;
        "# CONFIG_"*" is not set")
            opt=${line#\# }
            opt=${opt%% *}
            ! grep -q "^$opt=" "$KOBJ/.config" || die "kernel config still sets $opt"
            ;;
    esac
done <"$HERE/kernel/config"
log "building the kernel (make -j$(nproc) vmlinux bzImage; about 3 minutes from scratch on 2 cores)"
KSTART=$SECONDS
kmake -j"$(nproc)" vmlinux bzImage || die "kernel build failed (log: $LOGDIR/kernel.log): $(grep -m3 -E 'error|Error' "$LOGDIR/kernel.log")"
KREL=$(make -s -C "$KSRC" O="$KOBJ" kernelrelease 2>/dev/null)
readelf -h "$KOBJ/vmlinux" | grep -q 'Advanced Micro Devices X86-64' || die "vmlinux is not an x86-64 ELF"
log "kernel $KREL built in $((SECONDS - KSTART)) s"

# ----------------------------------------------------------- rootfs -------
ROOT="$WORK/rootfs"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,lib/$MULTIARCH,lib64,etc,proc,sys,dev,tmp,run,root,mnt,sys}
chmod 1777 "$ROOT/tmp"

BBTREE=$(extract "${DEB[busybox-static]}")
BUSYBOX="$BBTREE/bin/busybox"
[[ -x $BUSYBOX ]] || die "no /bin/busybox in ${DEB[busybox-static]}"
if readelf -l "$BUSYBOX" | grep -q 'Requesting program interpreter'; then
    die "busybox from busybox-static is not static"
fi
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
# An applet symlink for each applet, where busybox itself says it lives.
APPLETS=0
while read -r path; do
    # (linuxrc is for booting from a block device: not wanted here)
    [[ $path == */* && $path != bin/busybox ]] || continue
    if [[ -e "$ROOT/$path" || -L "$ROOT/$path" ]]; then continue; fi
    mkdir -p "$ROOT/${path%/*}"
    IFS=/ read -ra parts <<<"${path%/*}"
    rel=..
    for ((k = 1; k < ${#parts[@]}; k++)); do rel+=/..; done
    ln -s "$rel/bin/busybox" "$ROOT/$path"
    APPLETS=$((APPLETS + 1))
done < <("$BUSYBOX" --list-full)
((APPLETS > 100)) || die "busybox --list-full gave only $APPLETS applets"
for a in sh mount reboot poweroff base64 setsid cttyhack; do
    [[ -e "$ROOT/bin/$a" || -e "$ROOT/sbin/$a" || -e "$ROOT/usr/bin/$a" || -e "$ROOT/usr/sbin/$a" ]] ||
        die "busybox has no '$a' applet, which /init uses"
done

install -m 0755 "$HERE/init" "$ROOT/init"
# The workload: static, unstripped (its spin_user must reach perf report).
gcc -static -O2 -fno-omit-frame-pointer -o "$ROOT/bin/busy" "$HERE/busy.c" ||
    die "cannot build busy.c (gcc -static needs libc6-dev)"
install -m 0755 "$HERE/perf-checks" "$ROOT/bin/perf-checks"
# The kernel's symbols for perf report --kallsyms: reading /proc/kallsyms is
# emulated kernel code on the development hosts (minutes); System.map has
# the same format and, without KASLR, the same addresses.
mkdir -p "$ROOT/boot"
install -m 0644 "$KOBJ/System.map" "$ROOT/boot/System.map"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf 'vmm-guest\n' >"$ROOT/etc/hostname"

PERFTREE=$(extract "${DEB[linux-perf]}")
[[ -f "$PERFTREE/usr/bin/perf" ]] || die "no /usr/bin/perf in ${DEB[linux-perf]}"
readelf -h "$PERFTREE/usr/bin/perf" >/dev/null 2>&1 || die "/usr/bin/perf in ${DEB[linux-perf]} is not an ELF (a wrapper?)"
install -m 0755 "$PERFTREE/usr/bin/perf" "$ROOT/usr/bin/perf"
# perf dlopens its libtraceevent plugins to format tracepoints.
if [[ -d "$PERFTREE/usr/lib/traceevent/plugins" ]]; then
    mkdir -p "$ROOT/usr/lib/traceevent"
    cp -a "$PERFTREE/usr/lib/traceevent/plugins" "$ROOT/usr/lib/traceevent/"
fi

# ------------------------------------------- perf's shared libraries ------
# Every DT_NEEDED of every ELF in the tree (perf, the plugins, and each
# library added) is resolved against the Debian packages perf depends on
# (followed level by level through Depends, only as far as needed, and only
# through library packages, which Debian names lib*/zlib*). The libraries go
# to /lib/x86_64-linux-gnu under their sonames; the loader, from perf's
# PT_INTERP, goes to /lib64 too.

declare -A LIBPATH=() # soname -> file in an extracted package
declare -A LIBPKG=()  # soname -> package spec it came from
declare -A SEEN=()    # package -> 1 once queued
declare -A USED_PKG=()

# tree_resolve TREE PATH: follow symlinks inside TREE; print the file.
tree_resolve() {
    local tree=$1 p=$2 t n=0
    while [[ -L $p ]]; do
        t=$(readlink "$p")
        if [[ $t == /* ]]; then p="$tree$t"; else p="$(dirname "$p")/$t"; fi
        ((++n < 40)) || return 1
    done
    [[ -f $p ]] && printf '%s\n' "$p"
}

# index_tree TREE SPEC: record the shared objects a package provides.
index_tree() {
    local tree=$1 spec=$2 d f so real
    for d in lib/$MULTIARCH usr/lib/$MULTIARCH lib64 usr/lib64 lib usr/lib; do
        [[ -d "$tree/$d" ]] || continue
        while IFS= read -r f; do
            so=${f##*/}
            [[ -n ${LIBPATH[$so]:-} ]] && continue
            real=$(tree_resolve "$tree" "$f") || continue
            LIBPATH[$so]=$real
            LIBPKG[$so]=$spec
        done < <(find "$tree/$d" -maxdepth 1 \( -type f -o -type l \) -name '*.so*')
    done
}

# needed FILE: its DT_NEEDED sonames.
needed() {
    readelf -d --wide "$1" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\].*/\1/p'
}

INTERP=$(readelf -l --wide "$ROOT/usr/bin/perf" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p')
[[ -n $INTERP ]] || die "perf has no PT_INTERP; expected a dynamically linked perf"

# Level 0: the packages linux-perf depends on.
mapfile -t FRONTIER < <(depends "linux-perf=$PERF_VER" | grep -E '^(lib|zlib)' || true)
for p in "${FRONTIER[@]}"; do SEEN[$p]=1; done
SEEN[linux-perf]=1
index_tree "$PERFTREE" "linux-perf=$PERF_VER"

declare -A DONE_ELF=()
MISSING=()
unresolved() {
    # Walk the closure from the ELFs in the tree; copy what resolves; set
    # MISSING to what does not.
    local changed=1 f so
    local -A miss=()
    while ((changed)); do
        changed=0
        while IFS= read -r f; do
            [[ -n ${DONE_ELF[$f]:-} ]] && continue
            local all=1
            while IFS= read -r so; do
                [[ -n $so ]] || continue
                if [[ -e "$ROOT/lib/$MULTIARCH/$so" ]]; then continue; fi
                if [[ -n ${LIBPATH[$so]:-} ]]; then
                    install -m 0755 "${LIBPATH[$so]}" "$ROOT/lib/$MULTIARCH/$so"
                    USED_PKG[${LIBPKG[$so]}]=1
                    changed=1
                else
                    miss[$so]=1
                    all=0
                fi
            done < <(needed "$f")
            if ((all)); then DONE_ELF[$f]=1; fi
        done < <(find "$ROOT/usr/bin/perf" "$ROOT/usr/lib" "$ROOT/lib/$MULTIARCH" -type f \( -name perf -o -name '*.so*' \))
    done
    local m
    MISSING=()
    for m in "${!miss[@]}"; do
        if [[ ! -e "$ROOT/lib/$MULTIARCH/$m" ]]; then MISSING+=("$m"); fi
    done
}

LEVEL=0
while true; do
    unresolved
    interp_so=${INTERP##*/}
    if [[ ! -e "$ROOT/lib/$MULTIARCH/$interp_so" ]]; then
        if [[ -n ${LIBPATH[$interp_so]:-} ]]; then
            install -m 0755 "${LIBPATH[$interp_so]}" "$ROOT/lib/$MULTIARCH/$interp_so"
            USED_PKG[${LIBPKG[$interp_so]}]=1
        else
            MISSING+=("$interp_so")
        fi
    fi
    if ((${#MISSING[@]} == 0)); then break; fi
    ((${#FRONTIER[@]} > 0)) || die "unresolved libraries of perf: ${MISSING[*]} (no Debian library package among perf's dependencies provides them)"
    LEVEL=$((LEVEL + 1))
    ((LEVEL <= 8)) || die "library resolution did not converge (missing: ${MISSING[*]})"
    log "level $LEVEL: ${#MISSING[@]} libraries unresolved (${MISSING[*]}); fetching ${#FRONTIER[@]} dependency package(s)"
    mapfile -t SPECS < <(resolve "${FRONTIER[@]}" | awk '{print $1 "=" $2}')
    ((${#SPECS[@]})) || die "no downloadable versions of ${FRONTIER[*]}"
    declare -A LDEB=()
    fetch "${SPECS[@]}" >"$WORK/fetched"
    while read -r p path; do LDEB[$p]=$path; done <"$WORK/fetched"
    for spec in "${SPECS[@]}"; do
        p=${spec%%=*}
        [[ -n ${LDEB[$p]:-} ]] || die "no .deb for $spec"
        tree=$(extract "${LDEB[$p]}")
        index_tree "$tree" "$spec"
    done
    mapfile -t FRONTIER < <(depends "${SPECS[@]}" | grep -E '^(lib|zlib)' | while read -r p; do
        [[ -n ${SEEN[$p]:-} ]] || printf '%s\n' "$p"
    done)
    for p in "${FRONTIER[@]}"; do SEEN[$p]=1; done
done
# The loader where perf asks for it (/lib64/ld-linux-x86-64.so.2).
if [[ "$INTERP" != "/lib/$MULTIARCH/${INTERP##*/}" ]]; then
    mkdir -p "$ROOT$(dirname "$INTERP")"
    rel=$(dirname "${INTERP#/}" | sed -e 's|[^/][^/]*|..|g')
    ln -sf "$rel/lib/$MULTIARCH/${INTERP##*/}" "$ROOT$INTERP"
fi
NLIBS=$(find "$ROOT/lib/$MULTIARCH" -type f | wc -l)
log "perf: $NLIBS shared libraries from ${#USED_PKG[@]} packages"

# ------------------------------------------- stubbed perf libraries ------
# perf links Python and Perl (for `perf script` scripts) and S-Lang (its
# TUI). Where guest kernel code is emulated (the development hosts),
# unpacking their 13 MB at every boot and applying their 59 000 relocations
# at every perf start cost minutes per acceptance run, and the checks use
# none of them (reports are --stdio). Unless --full-perf, each is replaced
# by a library of the same soname that defines what the tree imports from
# it: functions that say what is missing and exit 127, data of the same
# size and kind. perf itself is Debian's, unchanged.
# stub_library FILE: replaces FILE (a library in the tree) by its stub.
stub_library() {
    local lib=$1 so=${1##*/}
    local c="$WORK/stub-$so.c" map="$WORK/stub-$so.map"
    # name@version of every dynamic symbol of the rest of the tree: what it
    # imports, and what perf holds by copy relocation (defined in perf, but
    # its initial value comes from the library).
    find "$ROOT/usr/bin/perf" "$ROOT/usr/lib" "$ROOT/lib/$MULTIARCH" -type f \
        \( -name perf -o -name '*.so*' \) ! -path "$lib" -print0 |
        xargs -0 nm -D 2>/dev/null | awk 'NF >= 2 {print $NF}' |
        grep -Ev '^(_init|_fini|_edata|_end|__bss_start)(@|$)' | sort -u >"$WORK/imports"
    # Those the library defines: kind, size, name, version (from --dyn-syms).
    readelf -W --dyn-syms "$lib" | awk '
        NR == FNR { split($1, p, "@"); want[p[1]] = (2 in p) ? p[2] : ""; next }
        $7 != "UND" && ($5 == "GLOBAL" || $5 == "WEAK") {
            n = $8; sub(/@.*/, "", n)
            if (n in want && !(n in done)) { done[n] = 1; print $4, $3, n, want[n] }
        }' "$WORK/imports" - >"$WORK/stub-syms"
    {
        printf '#include <stdio.h>\n#include <unistd.h>\n'
        printf 'static void missing(const char *sym)\n{\n'
        printf '\tfprintf(stderr, "perf: %%s: %s is a stub in this guest image (build.sh --full-perf keeps the real one)\\n", sym);\n' "$so"
        printf '\t_exit(127);\n}\n'
        awk '{
            size = $2 + 0
            if ($2 ~ /^0x/) { size = 0; for (i = 3; i <= length($2); i++)
                size = size * 16 + index("0123456789abcdef", tolower(substr($2, i, 1))) - 1 }
            if (size < 1) size = 8
            if ($1 == "FUNC" || $1 == "IFUNC") printf "void %s(void) { missing(\"%s\"); }\n", $3, $3
            else if ($1 == "TLS") printf "__thread char %s[%d] __attribute__((aligned(16)));\n", $3, size
            else printf "char %s[%d] __attribute__((aligned(16)));\n", $3, size
        }' "$WORK/stub-syms"
    } >"$c"
    # The versions the tree asks for, each symbol in its own.
    awk '$4 != "" { v[$4] = v[$4] "\t\t" $3 ";\n" }
        END { for (x in v) printf "%s {\n\tglobal:\n%s};\n", x, v[x] }' "$WORK/stub-syms" >"$map"
    local vflag=()
    [[ -s $map ]] && vflag=(-Wl,--version-script="$map")
    gcc -shared -fPIC -O2 -o "$WORK/stub-$so" -Wl,-soname,"$so" "${vflag[@]}" "$c" ||
        die "cannot build the stub of $so"
    install -m 0755 "$WORK/stub-$so" "$lib"
    log "perf: $so is a stub ($(wc -l <"$WORK/stub-syms") symbols the tree imports)"
}
if ((!FULL_PERF)); then
    # Also stubbed: the CoreSight trace decoder (Arm only; it brings C++'s
    # runtime) and CTF conversion (perf data convert --to-ctf; it brings
    # GLib): with them perf loaded 24 libraries at every start, 17 without.
    for lib in "$ROOT/lib/$MULTIARCH"/libpython3*.so.* "$ROOT/lib/$MULTIARCH"/libperl.so.* \
        "$ROOT/lib/$MULTIARCH"/libslang.so.* "$ROOT/lib/$MULTIARCH"/libopencsd_c_api.so.* \
        "$ROOT/lib/$MULTIARCH"/libbabeltrace-ctf.so.*; do
        [[ -f $lib && ! -L $lib ]] && stub_library "$lib"
    done
    # Libraries only the real ones needed go.
    declare -A KEEP=([${INTERP##*/}]=1)
    QUEUE=("$ROOT/usr/bin/perf" "$ROOT"/usr/lib/traceevent/plugins/*.so)
    while ((${#QUEUE[@]})); do
        f=${QUEUE[0]}
        QUEUE=("${QUEUE[@]:1}")
        [[ -f $f ]] || continue
        while IFS= read -r so; do
            [[ -n $so && -z ${KEEP[$so]:-} ]] || continue
            KEEP[$so]=1
            QUEUE+=("$ROOT/lib/$MULTIARCH/$so")
        done < <(needed "$f")
    done
    for lib in "$ROOT/lib/$MULTIARCH"/*; do
        [[ -n ${KEEP[${lib##*/}]:-} ]] || { rm -f "$lib"; log "perf: ${lib##*/} is not needed (only by stubbed libraries)"; }
    done
    # Without S-Lang, perf's report, annotate and top print as with --stdio
    # rather than fail at a terminal.
    mkdir -p "$ROOT/etc"
    printf '[tui]\n\treport = false\n\tannotate = false\n\ttop = false\n' >"$ROOT/etc/perfconfig"
fi

# The loader's cache: without /etc/ld.so.cache it tries each library in a
# list of directories (about ten failed opens at each perf start, each an
# emulated path walk on the development hosts).
printf '/lib/%s\n' "$MULTIARCH" >"$ROOT/etc/ld.so.conf"
ldconfig -X -r "$ROOT" || die "ldconfig -r $ROOT failed"

# Check: perf runs from the tree alone (chroot when we may, else through the
# tree's own loader, refusing any library from outside the tree), every
# symbol it imports bound at start (LD_BIND_NOW: a stub that misses one
# fails here, not in the guest).
if [[ $EUID -eq 0 ]] && command -v chroot >/dev/null; then
    PERF_V=$(LD_BIND_NOW=1 chroot "$ROOT" /usr/bin/perf --version 2>&1) || die "perf does not run in the guest tree: $PERF_V"
else
    LIST=$("$ROOT/lib/$MULTIARCH/${INTERP##*/}" --inhibit-cache --library-path "$ROOT/lib/$MULTIARCH" \
        --list "$ROOT/usr/bin/perf" 2>&1) || die "perf's libraries do not resolve in the tree: $LIST"
    if grep '=>' <<<"$LIST" | grep -v "=> $ROOT/" | grep -q .; then
        die "perf would load libraries from outside the tree: $(grep '=>' <<<"$LIST" | grep -v "=> $ROOT/")"
    fi
    PERF_V=$(LD_BIND_NOW=1 "$ROOT/lib/$MULTIARCH/${INTERP##*/}" --inhibit-cache \
        --library-path "$ROOT/lib/$MULTIARCH" "$ROOT/usr/bin/perf" --version 2>&1) || die "perf does not run from the tree: $PERF_V"
fi
log "$PERF_V runs from the guest tree"

# -------------------------------------------------------- initramfs -------
# newc entry with no data (for dev/console, so that no mknod is needed).
newc() { # NAME MODE RDEVMAJOR RDEVMINOR INO
    local name=$1 mode=$2 rmaj=$3 rmin=$4 ino=$5 namesize hdr pad
    namesize=$((${#name} + 1))
    hdr=$(printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0)
    printf '%s%s\0' "$hdr" "$name"
    pad=$(((4 - (110 + namesize) % 4) % 4))
    head -c "$pad" /dev/zero
}
{
    newc dev $((0040755)) 0 0 1
    newc dev/console $((0020600)) 5 1 2
    newc TRAILER!!! 0 0 0 0
} >"$WORK/console.cpio"
# cpio's own archive, with sorted names for a reproducible image. The kernel
# unpacks both archives, one after the other.
(cd "$ROOT" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) >"$WORK/main.cpio"
# Uncompressed: unpacking is emulated kernel code on the development hosts,
# where a gzip-compressed image of this size did not unpack in 300 s.
cat "$WORK/console.cpio" "$WORK/main.cpio" >"$WORK/initramfs.cpio"

# Check: the archives list what the guest needs.
LISTING=$(cat <(cpio -t --quiet <"$WORK/console.cpio") <(cpio -t --quiet <"$WORK/main.cpio") | sed 's|^\./||')
for f in dev/console init bin/busybox bin/sh bin/busy bin/perf-checks usr/bin/perf "lib/$MULTIARCH/${INTERP##*/}" "${INTERP#/}"; do
    grep -qx -- "$f" <<<"$LISTING" || die "initramfs lacks $f"
done
rm -f "$WORK/console.cpio" "$WORK/main.cpio"

# ---------------------------------------------------------- outputs -------
cp "$KOBJ/vmlinux" "$WORK/vmlinux"
cp "$KOBJ/arch/x86/boot/bzImage" "$WORK/bzImage"
cp "$KOBJ/.config" "$WORK/config"
grep -v '^#' "$HERE/kernel/cmdline" | tr -s ' \n' ' ' | sed 's/^ //; s/ $//' >"$WORK/cmdline"
echo >>"$WORK/cmdline"
{
    echo "# Linux + perf guest built by guest-images/linux/build.sh"
    echo "kernel-release $KREL"
    echo "package $KSRC_PKG $KSRC_VER"
    for p in "${KPATCHES[@]}"; do echo "patch ${p##*/} $(sha256sum "$p" | awk '{print $1}')"; done
    echo "package busybox-static $BB_VER"
    echo "package linux-perf $PERF_VER"
    for spec in "${!USED_PKG[@]}"; do echo "package ${spec%%=*} ${spec#*=}"; done | sort -u
    echo "perf-version $PERF_V"
    echo "cmdline $(cat "$WORK/cmdline")"
    (cd "$WORK" && sha256sum bzImage vmlinux initramfs.cpio | sed 's/^/sha256 /')
    echo "# initramfs contents"
    printf '%s\n' "$LISTING"
} >"$WORK/manifest.txt"
{
    echo "script $SCRIPT_SUM"
    echo "top $KSRC_PKG=$KSRC_VER busybox-static=$BB_VER linux-perf=$PERF_VER"
    for spec in "${!USED_PKG[@]}"; do
        [[ ${spec%%=*} == linux-perf ]] || echo "lib $spec"
    done | sort -u
} >"$WORK/inputs"

rm -f "$STAMP"
rm -rf "$OUT/rootfs"
mv "$ROOT" "$OUT/rootfs"
rm -f "$OUT/initramfs.cpio.gz" # the compressed image of earlier versions
for f in bzImage vmlinux initramfs.cpio cmdline config manifest.txt; do
    [[ -f "$WORK/$f" ]] && mv -f "$WORK/$f" "$OUT/$f"
done
mv "$WORK/inputs" "$STAMP"

DL_BYTES=0
for f in "${DOWNLOADED[@]}"; do DL_BYTES=$((DL_BYTES + $(stat -c %s "$CACHE/debs/$f"))); done
log "built in $((SECONDS - START)) s; downloaded ${#DOWNLOADED[@]} package(s), $((DL_BYTES / 1024 / 1024)) MiB (cache: $CACHE)"
print_outputs
