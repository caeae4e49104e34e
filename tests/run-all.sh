#!/bin/sh
# The whole test suite, as CI runs it: a release build with -Werror, an
# ASan/UBSan build, and short libFuzzer runs, each tested with ctest. The
# release build also builds kube-apiserver, kubectl and etcd from Go modules
# (tests/apiserver, cached by Go between runs) and runs the daemon behind
# them once (ctest label "apiserver"); the other two builds leave them out. Every
# test starts and stops its own swtpm on free 127.0.0.1 ports; a missing
# dependency fails the run, it never skips.
#   tests/run-all.sh [BUILD_ROOT]      (default: ./build-tests)
set -eu
src=$(cd "$(dirname "$0")/.." && pwd)
root=${1:-$src/build-tests}
jobs=$(nproc)

run_suite() {
        name=$1; shift
        echo "=== $name build ==="
        cmake -S "$src" -B "$root/$name" -DTPMKMS_WERROR=ON "$@"
        cmake --build "$root/$name" -j"$jobs"
        echo "=== $name tests ==="
        ctest --test-dir "$root/$name" --output-on-failure --no-tests=error -j"$jobs" --timeout 600
}

run_suite release -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTPMKMS_APISERVER_TESTS=ON -DTPMKMS_VALGRIND=ON
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        run_suite sanitize -DCMAKE_BUILD_TYPE=Debug -DTPMKMS_SANITIZE=ON -DTPMKMS_APISERVER_TESTS=OFF
CC=clang run_suite fuzz -DCMAKE_BUILD_TYPE=Debug -DTPMKMS_FUZZ=ON -DBUILD_TESTING=ON -DTPMKMS_FUZZ_SECONDS=60 \
        -DTPMKMS_FUZZ_ONLY=ON -DTPMKMS_APISERVER_TESTS=OFF
echo "=== all suites passed ==="
