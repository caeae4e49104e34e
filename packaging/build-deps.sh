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
        libcmocka-dev etcd-server etcd-client \
        swtpm swtpm-tools tpm2-tools \
        python3 python3-grpcio python3-grpc-tools python3-pykmip python3-yaml python3-cryptography \
        systemd rpm dpkg-dev lintian file procps iproute2 util-linux openssl \
        prometheus man-db tpm-udev libtss2-tcti-device0 init-system-helpers passwd >/dev/null
