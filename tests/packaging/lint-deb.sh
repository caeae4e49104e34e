#!/bin/sh
# lintian on the .deb: every tag is printed; an error tag (or lintian failing
# to run) fails the test. lintian exits 0 when it found no error.
#   lint-deb.sh PKG_DIR
set -eu
deb=$(ls "$1"/tpmkms_*.deb)
rc=0
lintian --pedantic --display-info "$deb" || rc=$?
if [ "$rc" -ne 0 ]; then
	echo "lint-deb.sh: lintian exited $rc (errors above)" >&2
	exit 1
fi
echo "lint-deb.sh: no lintian errors in $(basename "$deb")"
