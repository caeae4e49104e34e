# tpmkmsd behind a real kube-apiserver and etcd, built from Go modules by
# tests/apiserver/build.sh (versions pinned in tests/apiserver/go.mod) into
# <build>/apiserver/bin. Included from tests/CMakeLists.txt when
# TPMKMS_APISERVER_TESTS is on (the release suite of tests/run-all.sh). A
# missing or too old Go, or a failed module download, fails the build: it
# never skips. Uses E2E_ENV and the e2e stubs from tests/e2e/tests.cmake.
set(APISERVER_SRC ${CMAKE_CURRENT_SOURCE_DIR}/apiserver)
set(APISERVER_OUT ${CMAKE_BINARY_DIR}/apiserver)

find_program(TPMKMS_GO go PATHS /usr/local/go/bin)
if(NOT TPMKMS_GO)
  message(FATAL_ERROR "no Go toolchain: run packaging/build-deps.sh, or configure with "
                      "-DTPMKMS_APISERVER_TESTS=OFF to build without the kube-apiserver tests")
endif()
file(STRINGS ${APISERVER_SRC}/go.mod APISERVER_GO_LINE REGEX "^go [0-9.]+$")
string(REGEX REPLACE "^go " "" APISERVER_GO_MIN "${APISERVER_GO_LINE}")
execute_process(COMMAND ${TPMKMS_GO} env GOVERSION OUTPUT_VARIABLE TPMKMS_GO_VERSION
                OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE GO_ENV_FAILED)
string(REGEX REPLACE "^go([0-9.]+).*" "\\1" TPMKMS_GO_VERSION "${TPMKMS_GO_VERSION}")
if(GO_ENV_FAILED OR TPMKMS_GO_VERSION VERSION_LESS APISERVER_GO_MIN)
  message(FATAL_ERROR "${TPMKMS_GO} is go '${TPMKMS_GO_VERSION}'; tests/apiserver/go.mod needs "
                      ">= ${APISERVER_GO_MIN}: run packaging/build-deps.sh")
endif()

add_custom_command(
  OUTPUT ${APISERVER_OUT}/bin/.built
  COMMAND ${APISERVER_SRC}/build.sh ${APISERVER_OUT} ${TPMKMS_GO}
  COMMAND ${CMAKE_COMMAND} -E touch ${APISERVER_OUT}/bin/.built
  DEPENDS ${APISERVER_SRC}/build.sh ${APISERVER_SRC}/go.mod ${APISERVER_SRC}/go.sum
          ${APISERVER_SRC}/tools.go ${APISERVER_SRC}/etcd/main.go
  USES_TERMINAL
  COMMENT "go build kube-apiserver, kubectl, etcd (tests/apiserver/build.sh)")
add_custom_target(apiserver_bins ALL DEPENDS ${APISERVER_OUT}/bin/.built)

# apiserver_test(CLASS TIMEOUT): one TestCase of tests/apiserver/test_apiserver.py.
# Each starts an apiserver and etcd beside swtpm and tpmkmsd: they hold the
# e2e load lock so they neither slow each other nor the load-sensitive tests.
function(apiserver_test module class timeout)
  add_test(NAME apiserver_${class}
           COMMAND ${PYTHON3} ${APISERVER_SRC}/${module}.py -v ${class})
  set_tests_properties(apiserver_${class} PROPERTIES
    ENVIRONMENT "${E2E_ENV};TPMKMS_APISERVER_BIN=${APISERVER_OUT}/bin"
    TIMEOUT ${timeout} LABELS apiserver RESOURCE_LOCK tpmkms-e2e-load)
endfunction()

apiserver_test(test_apiserver TestStorage 300)
apiserver_test(test_apiserver TestConfiguredConfigMaps 300)
apiserver_test(test_apiserver TestRotation 400)
apiserver_test(test_apiserver TestPluginDown 400)
apiserver_test(test_apiserver TestMeasuredBoot 400)
apiserver_test(test_apiserver TestFailClosed 400)
apiserver_test(test_apiserver TestRestartMany 900)
# Two hosts in fleet mode (PyKMIP, see tests/e2e/tests.cmake) behind two
# apiservers sharing one etcd.
apiserver_test(test_apiserver_fleet FleetRotation 600)
