#!/bin/sh
# Install what building, running and testing tpmkms needs on Debian 12 (as root).
# Idempotent; run again after pulling changes that add dependencies.
set -eu
export DEBIAN_FRONTEND=noninteractive
if [ "$(id -u)" -ne 0 ]; then
        echo "build-deps.sh: run as root (it calls apt-get)" >&2
        exit 1
fi
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
        build-essential cmake pkg-config clang libclang-rt-14-dev \
        libtss2-dev libtss2-tcti-swtpm0 libssl-dev libnghttp2-dev \
        protobuf-c-compiler libprotobuf-c-dev libsystemd-dev libinih-dev libmicrohttpd-dev \
        libcmocka-dev etcd-server etcd-client valgrind \
        swtpm swtpm-tools tpm2-tools \
        python3 python3-grpcio python3-grpc-tools python3-pykmip python3-yaml python3-cryptography \
        systemd rpm dpkg-dev lintian file procps iproute2 util-linux openssl \
        prometheus man-db tpm-udev libtss2-tcti-device0 init-system-helpers passwd >/dev/null

# Go for the kube-apiserver tests (tests/apiserver/build.sh builds kube-apiserver,
# kubectl and etcd from Go modules): at least the go line of tests/apiserver/go.mod.
# An upstream toolchain in /usr/local/go or a go on PATH is used when new enough.
# Debian 12 has none new enough (bookworm-backports stops at 1.23): stop, saying so.
src=$(cd "$(dirname "$0")/.." && pwd)
go_need=$(sed -n 's/^go \([0-9][0-9.]*\)$/\1/p' "$src/tests/apiserver/go.mod")
version_ok() {          # $1 >= go_need
        [ "$(printf '%s\n%s\n' "$go_need" "$1" | sort -V | head -n1)" = "$go_need" ]
}
find_go() {
        for g in /usr/local/go/bin/go $(command -v go || true); do
                v=$("$g" env GOVERSION 2>/dev/null) || continue
                if version_ok "${v#go}"; then
                        echo "$g"
                        return 0
                fi
        done
        return 1
}
if ! find_go >/dev/null; then
        echo "build-deps.sh: the kube-apiserver tests need Go >= $go_need (tests/apiserver/go.mod)" \
             "and found none; install it in /usr/local/go, or configure with" \
             "-DTPMKMS_APISERVER_TESTS=OFF." >&2
        exit 1
fi
echo "build-deps.sh: Go for tests/apiserver: $(find_go)"
