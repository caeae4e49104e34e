#!/bin/sh
# Build this build's packages with CPack into OUT, from the project's own
# install rules:
#   tpmkms_VER_ARCH.deb, tpmkms-VER-1.ARCH.rpm, and new/tpmkms_VER+1_ARCH.deb,
# the "newer build" that test_deb.py upgrades to (same binaries, higher
# package version, so dpkg treats it as an upgrade).
#   build-packages.sh CPACK BUILD_DIR OUT VERSION
set -eu
cpack=$1 build=$2 out=$3 ver=$4
rm -rf "$out"
mkdir -p "$out/new"
cd "$build"
"$cpack" -G DEB -B "$out"
"$cpack" -G RPM -B "$out"
"$cpack" -G DEB -B "$out/new" -D CPACK_PACKAGE_VERSION="$ver+1"
rm -rf "$out/_CPack_Packages" "$out/new/_CPack_Packages"
ls -l "$out" "$out/new"
