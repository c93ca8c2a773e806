#!/usr/bin/env bash
# The arm64 userland that tests/test_aarch64_emulated.py runs kernels in under qemu-user:
# Debian bookworm's python3.11 (+ headers) and numpy, and ml_dtypes from its aarch64 wheel.
# Installs the host tools it needs (Debian packages) when missing. Idempotent: does nothing when
# the root of this recipe is already there; a failed or killed run leaves no half root.
# Usage: bash tests/aarch64/setup-root.sh [ROOT]     (default: build/aarch64-root)
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=${1:-build/aarch64-root}
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
PACKAGES=python3.11,libpython3.11-dev,python3-numpy,libstdc++6
ML_DTYPES=0.5.1              # pinned; needs numpy >= 1.23.3 on Python 3.11: bookworm has 1.24
RECIPE="$SUITE $PACKAGES ml_dtypes==$ML_DTYPES"

fail() { echo "setup-root.sh: $*" >&2; exit 1; }

# host tools: command -> Debian package
declare -A TOOLS=([ld.lld]=lld [qemu-aarch64-static]=qemu-user-static [mmdebstrap]=mmdebstrap
                  [aarch64-linux-gnu-objdump]=binutils-aarch64-linux-gnu
                  [aarch64-linux-gnu-gcc]=gcc-aarch64-linux-gnu)
missing=()
for tool in "${!TOOLS[@]}"; do
    command -v "$tool" >/dev/null || missing+=("${TOOLS[$tool]}")
done
if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || fail "missing ${missing[*]}: run as root, or apt-get install ${missing[*]}"
    echo "setup-root.sh: installing ${missing[*]}"
    apt-get update -qq || fail "apt-get update failed (no Debian mirror reachable?)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]} failed"
fi

if [ -f "$ROOT/.recipe" ] && [ "$(cat "$ROOT/.recipe")" = "$RECIPE" ]; then
    exit 0
fi

echo "setup-root.sh: building the arm64 root $ROOT ($RECIPE)"
start=$(date +%s)
mkdir -p "$(dirname "$ROOT")"
stage="$ROOT.tmp"
rm -rf "$stage" "$ROOT"
trap 'rm -rf "$stage"' EXIT
# extract: unpack the packages and their dependencies, run no maintainer script (no emulation)
mmdebstrap --quiet --arch=arm64 --variant=extract --include="$PACKAGES" "$SUITE" "$stage" \
    "$MIRROR" || fail "mmdebstrap of $SUITE arm64 from $MIRROR failed"
# what update-alternatives would have linked (numpy loads libblas.so.3 and liblapack.so.3)
lib="$stage/usr/lib/aarch64-linux-gnu"
ln -s blas/libblas.so.3 "$lib/libblas.so.3"
ln -s lapack/liblapack.so.3 "$lib/liblapack.so.3"
wheels=$(mktemp -d)
python3 -m pip download --quiet --no-deps --only-binary=:all: --platform manylinux2014_aarch64 \
    --python-version 3.11 -d "$wheels" "ml_dtypes==$ML_DTYPES" \
    || fail "pip download of the aarch64 wheel of ml_dtypes==$ML_DTYPES failed"
python3 -m zipfile -e "$wheels"/ml_dtypes-*.whl "$stage/opt/site"
rm -rf "$wheels"
echo "$RECIPE" > "$stage/.recipe"
mv "$stage" "$ROOT"
trap - EXIT
echo "setup-root.sh: $ROOT ready in $(( $(date +%s) - start )) s"
