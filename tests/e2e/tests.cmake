# End-to-end tests: the real tpmkmsd on a real swtpm, driven by a real gRPC
# client (python3-grpcio). Python stubs are generated at build time from the
# project's own proto, like the C code is. Included from tests/CMakeLists.txt.
execute_process(COMMAND ${PYTHON3} -c "import grpc, grpc_tools.protoc"
                RESULT_VARIABLE E2E_PY_MISSING OUTPUT_QUIET ERROR_QUIET)
if(E2E_PY_MISSING)
  message(FATAL_ERROR "${PYTHON3} lacks grpc/grpc_tools: run packaging/build-deps.sh "
                      "(python3-grpcio python3-grpc-tools)")
endif()
foreach(tool swtpm swtpm_ioctl tpm2_pcrextend tpm2_pcrread setpriv)
  find_program(E2E_${tool} ${tool} REQUIRED)
endforeach()

set(E2E_PROTO ${PROJECT_SOURCE_DIR}/plugin/kms_v2.proto)
set(E2E_STUBS ${CMAKE_CURRENT_BINARY_DIR}/e2e/stubs)
add_custom_command(
  OUTPUT ${E2E_STUBS}/kms_v2_pb2.py ${E2E_STUBS}/kms_v2_pb2_grpc.py
  COMMAND ${CMAKE_COMMAND} -E make_directory ${E2E_STUBS}
  COMMAND ${PYTHON3} -m grpc_tools.protoc --proto_path=${PROJECT_SOURCE_DIR}/plugin
          --python_out=${E2E_STUBS} --grpc_python_out=${E2E_STUBS} ${E2E_PROTO}
  DEPENDS ${E2E_PROTO}
  COMMENT "grpc_tools.protoc kms_v2.proto (Python stubs for the e2e tests)")
add_custom_target(e2e_stubs ALL
  DEPENDS ${E2E_STUBS}/kms_v2_pb2.py ${E2E_STUBS}/kms_v2_pb2_grpc.py)

set(E2E_ENV
  TPMKMSD=$<TARGET_FILE:tpmkmsd>
  TPMKMSCTL=$<TARGET_FILE:tpmkmsctl>
  TPMKMS_STUBS=${E2E_STUBS}
  TPMKMS_SOURCE_DIR=${PROJECT_SOURCE_DIR}
  TPMKMS_VERSION=${PROJECT_VERSION}
  TPMKMS_SANITIZED=$<BOOL:${TPMKMS_SANITIZE}>
  PYTHONDONTWRITEBYTECODE=1)

# e2e_test(NAME TIMEOUT): tests/e2e/NAME.py, a unittest module. Every test
# brings its own swtpm (free loopback ports), temp dir and daemon, so they may
# run in parallel; the load-sensitive ones share the "tpmkms-e2e-load" lock.
function(e2e_test name timeout)
  cmake_parse_arguments(T "LOAD" "" "" ${ARGN})
  add_test(NAME e2e_${name}
           COMMAND ${PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/${name}.py -v)
  set_tests_properties(e2e_${name} PROPERTIES
    ENVIRONMENT "${E2E_ENV}" TIMEOUT ${timeout} LABELS e2e)
  if(T_LOAD)
    set_tests_properties(e2e_${name} PROPERTIES RESOURCE_LOCK tpmkms-e2e-load)
  endif()
endfunction()

# e2e_valgrind(NAME): tests/e2e/NAME.py again with the daemon under valgrind.
function(e2e_valgrind name)
  if(TPMKMS_VALGRIND)
    add_test(NAME e2e_${name}-valgrind
             COMMAND ${PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/e2e/${name}.py -v)
    set_tests_properties(e2e_${name}-valgrind PROPERTIES
      ENVIRONMENT "${E2E_ENV};TPMKMS_VALGRIND=1" TIMEOUT 900 LABELS "e2e;valgrind"
      RESOURCE_LOCK tpmkms-e2e-load)
  endif()
endfunction()

e2e_test(test_contract 180 LOAD)
e2e_valgrind(test_contract)
e2e_test(test_sealing 300)
e2e_test(test_lifecycle 240)
e2e_valgrind(test_lifecycle)
e2e_test(test_sealed_state 300)
e2e_test(test_tpm_faults 240)
e2e_test(test_files 240 LOAD)
e2e_test(test_secrets 180)
e2e_test(test_hostile 240 LOAD)
e2e_test(test_process 240 LOAD)
e2e_test(test_snapshot 240)

# The README's first command: the demo must do what it shows.
add_test(NAME e2e_demo COMMAND ${PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/demo/demo.py
         ${CMAKE_BINARY_DIR})
set_tests_properties(e2e_demo PROPERTIES
  ENVIRONMENT "${E2E_ENV}" TIMEOUT 120 LABELS e2e)

# Fleet sync against a real central KMS: PyKMIP 0.10's server (python3-pykmip,
# run by /usr/bin/python3) with certificates made by openssl.
foreach(tool openssl pykmip-server)
  find_program(E2E_${tool} ${tool} REQUIRED)
endforeach()
e2e_test(test_fleet 420 LOAD)
# Metrics, alert rules (promtool from Debian's prometheus) and the dashboard.
find_program(E2E_promtool promtool REQUIRED)
e2e_test(test_metrics 300)
# The audit trail on a real systemd-journald in a private mount namespace.
find_program(E2E_unshare unshare REQUIRED)
find_program(E2E_journalctl journalctl REQUIRED)
e2e_test(test_audit 180)
e2e_test(test_identity 300 LOAD)
e2e_valgrind(test_identity)
e2e_test(test_fleet_load 300 LOAD)
# tpmkmsctl doctor against broken hosts (swtpm, PyKMIP).
e2e_test(test_doctor 300)
add_test(NAME e2e_demo_fleet
         COMMAND ${PYTHON3} ${CMAKE_CURRENT_SOURCE_DIR}/demo/demo_fleet.py ${CMAKE_BINARY_DIR})
set_tests_properties(e2e_demo_fleet PROPERTIES
  ENVIRONMENT "${E2E_ENV}" TIMEOUT 180 LABELS e2e RESOURCE_LOCK tpmkms-e2e-load)
