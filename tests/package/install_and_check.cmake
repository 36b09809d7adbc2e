# cmake -DBUILD_DIR=... -DPREFIX=... -DSOURCE_DIR=... -DINCLUDEDIR=... -DCMAKEDIR=... -DPKGCONFIGDIR=... -DDOCDIR=...
#       [-DSAFETENSORS=1] [-DCONFIG=...] -P install_and_check.cmake
# Installs the build in BUILD_DIR into a fresh PREFIX and checks that exactly the expected files arrived: every
# header under include/head_attention, the CMake package files (with HeadAttentionSafetensorsTargets.cmake when
# SAFETENSORS, i.e. the build has HeadAttention::safetensors), the pkg-config file and the license, README and
# changelog in DOCDIR, and nothing else.

file(REMOVE_RECURSE "${PREFIX}")
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(COMMAND "${CMAKE_COMMAND}" --install "${BUILD_DIR}" --prefix "${PREFIX}" ${config_args}
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake --install ${BUILD_DIR} --prefix ${PREFIX} failed: ${result}")
endif()

file(GLOB_RECURSE headers RELATIVE "${SOURCE_DIR}/include" "${SOURCE_DIR}/include/head_attention/*.hpp")
set(expected "")
foreach(header IN LISTS headers)
  list(APPEND expected "${INCLUDEDIR}/${header}")
endforeach()
list(APPEND expected "${CMAKEDIR}/HeadAttentionConfig.cmake" "${CMAKEDIR}/HeadAttentionConfigVersion.cmake"
     "${CMAKEDIR}/HeadAttentionTargets.cmake" "${PKGCONFIGDIR}/head_attention.pc" "${DOCDIR}/LICENSE"
     "${DOCDIR}/README.md" "${DOCDIR}/CHANGELOG.md")
if(SAFETENSORS)
  list(APPEND expected "${CMAKEDIR}/HeadAttentionSafetensorsTargets.cmake")
endif()
list(SORT expected)

file(GLOB_RECURSE installed RELATIVE "${PREFIX}" "${PREFIX}/*")
list(SORT installed)
if(NOT installed STREQUAL expected)
  string(REPLACE ";" "\n  " installed_lines "${installed}")
  string(REPLACE ";" "\n  " expected_lines "${expected}")
  message(FATAL_ERROR "installed files:\n  ${installed_lines}\nexpected:\n  ${expected_lines}")
endif()
list(LENGTH installed count)
message(STATUS "installed ${count} files into ${PREFIX}, as expected")
