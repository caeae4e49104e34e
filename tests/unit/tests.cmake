# One line per unit test; the name is the file tests/unit/<name>.c.
tpmkms_unit_test(test-tpm LIBS tpm SWTPM)
tpmkms_unit_test(test-config LIBS agent)
tpmkms_unit_test(test-policy LIBS agent)
tpmkms_unit_test(test-grpc LIBS plugin kms_v2_pb)
tpmkms_unit_test(test-service LIBS plugin kms_v2_pb)
tpmkms_unit_test(test-keyring LIBS keystore)
tpmkms_unit_test(test-envelope LIBS keystore)
tpmkms_unit_test(test-server LIBS plugin PkgConfig::NGHTTP2)
tpmkms_unit_test(test-socket LIBS common)
tpmkms_unit_test(test-cache LIBS keystore)
tpmkms_unit_test(test-snapshot LIBS snapshot)
# test-central: agent/kmip/client.c and tls.c against real servers on
# 127.0.0.1 (PyKMIP, openssl s_server variants, a silent TCP listener) that
# tests/unit/central-harness.py starts, seeds and always stops.
add_executable(test-central unit/test-central.c)
target_link_libraries(test-central PRIVATE agent OpenSSL::SSL PkgConfig::CMOCKA)
add_test(NAME test-central
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/unit/central-harness.py
                 $<TARGET_FILE:test-central>)
set_tests_properties(test-central PROPERTIES TIMEOUT 300)
tpmkms_unit_test(test-ttlv LIBS kmip)
tpmkms_unit_test(test-kmip LIBS kmip)
# test-kmip-pykmip: agent/kmip/message.c's requests and parsers against a real PyKMIP
# 0.10 on a free 127.0.0.1 port that tests/unit/kmip-interop.py starts (own
# CA, two client identities, shared operation policy), seeds and always stops.
add_executable(test-kmip-pykmip unit/test-kmip-pykmip.c)
target_link_libraries(test-kmip-pykmip PRIVATE kmip keystore OpenSSL::SSL)
add_test(NAME test-kmip-pykmip
         COMMAND /usr/bin/python3 ${CMAKE_CURRENT_SOURCE_DIR}/unit/kmip-interop.py
                 $<TARGET_FILE:test-kmip-pykmip>)
set_tests_properties(test-kmip-pykmip PROPERTIES TIMEOUT 120)
