# Install and export rules for the HeadAttention package, included from the top-level CMakeLists.txt when
# HEAD_ATTENTION_INSTALL is ON. Consumers then have three ways in:
#   find_package(HeadAttention CONFIG)  against an install prefix or this build tree
#   pkg-config --cflags head_attention  for builds without CMake
#   add_subdirectory / FetchContent     which never reach this file
# The library is header-only, so everything lands in arch-independent places (include/, share/).

include(CMakePackageConfigHelpers)

# Installing needs nothing built (headers and generated text files), so `make install` and cpack skip building the
# tests, examples and benchmarks that `all` holds.
if(NOT DEFINED CMAKE_SKIP_INSTALL_ALL_DEPENDENCY)
  set(CMAKE_SKIP_INSTALL_ALL_DEPENDENCY ON)
endif()
include("${CMAKE_CURRENT_LIST_DIR}/install_dirs.cmake")

# Whether the target links OpenMP decides which dependencies the package must look for. Read it off the target
# itself rather than the option, so the package files can never disagree with what was exported.
get_target_property(_head_attention_links HeadAttention INTERFACE_LINK_LIBRARIES)
if("OpenMP::OpenMP_CXX" IN_LIST _head_attention_links)
  set(HEAD_ATTENTION_USES_OPENMP ON)
else()
  set(HEAD_ATTENTION_USES_OPENMP OFF)
endif()
unset(_head_attention_links)

# Headers and the target.
install(
  DIRECTORY "${PROJECT_SOURCE_DIR}/include/head_attention"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
  FILES_MATCHING
  PATTERN "*.hpp")
install(TARGETS HeadAttention EXPORT HeadAttentionTargets INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")
install(
  EXPORT HeadAttentionTargets
  NAMESPACE HeadAttention::
  FILE HeadAttentionTargets.cmake
  DESTINATION "${HEAD_ATTENTION_INSTALL_CMAKEDIR}")

# HeadAttention::safetensors, when nlohmann_json was found, in an export file of its own: the package config loads
# it only when nlohmann_json can be found too, so that users without nlohmann_json still get the core target.
if(TARGET HeadAttention_safetensors)
  set(HEAD_ATTENTION_EXPORTS_SAFETENSORS ON)
  install(TARGETS HeadAttention_safetensors EXPORT HeadAttentionSafetensorsTargets)
  install(
    EXPORT HeadAttentionSafetensorsTargets
    NAMESPACE HeadAttention::
    FILE HeadAttentionSafetensorsTargets.cmake
    DESTINATION "${HEAD_ATTENTION_INSTALL_CMAKEDIR}")
  export(
    EXPORT HeadAttentionSafetensorsTargets
    NAMESPACE HeadAttention::
    FILE "${PROJECT_BINARY_DIR}/HeadAttentionSafetensorsTargets.cmake")
else()
  set(HEAD_ATTENTION_EXPORTS_SAFETENSORS OFF)
endif()

# The config and version files are written to the top of the build tree, next to the build-tree export below,
# so that -DHeadAttention_DIR=<this build dir> works as well as an installed copy.
configure_package_config_file(
  "${CMAKE_CURRENT_LIST_DIR}/HeadAttentionConfig.cmake.in" "${PROJECT_BINARY_DIR}/HeadAttentionConfig.cmake"
  INSTALL_DESTINATION "${HEAD_ATTENTION_INSTALL_CMAKEDIR}")
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/HeadAttentionConfigVersion.cmake"
  VERSION ${PROJECT_VERSION}
  COMPATIBILITY SameMajorVersion ARCH_INDEPENDENT)
install(FILES "${PROJECT_BINARY_DIR}/HeadAttentionConfig.cmake"
              "${PROJECT_BINARY_DIR}/HeadAttentionConfigVersion.cmake"
        DESTINATION "${HEAD_ATTENTION_INSTALL_CMAKEDIR}")
export(
  EXPORT HeadAttentionTargets
  NAMESPACE HeadAttention::
  FILE "${PROJECT_BINARY_DIR}/HeadAttentionTargets.cmake")

# pkg-config. The prefix must be the one actually installed to, which `cmake --install --prefix` or CPack can
# change after configuration, and a .tar.gz package may be unpacked anywhere. So the file finds the prefix from its
# own place, prefix=${pcfiledir}/<up to the prefix> (pkg-config and pkgconf both define pcfiledir), whenever the
# pkg-config directory is relative to the prefix; with an absolute one, it is configured in two passes instead:
# everything but the prefix now, and @CMAKE_INSTALL_PREFIX@ by the install script itself, just before the file is
# copied.
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(HEAD_ATTENTION_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(HEAD_ATTENTION_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
if(HEAD_ATTENTION_USES_OPENMP)
  set(HEAD_ATTENTION_PC_OPENMP_FLAGS " ${OpenMP_CXX_FLAGS}")
else()
  set(HEAD_ATTENTION_PC_OPENMP_FLAGS "")
endif()
if(IS_ABSOLUTE "${HEAD_ATTENTION_INSTALL_PKGCONFIGDIR}")
  set(HEAD_ATTENTION_PC_PREFIX "@CMAKE_INSTALL_PREFIX@")
  configure_file("${CMAKE_CURRENT_LIST_DIR}/head_attention.pc.in" "${PROJECT_BINARY_DIR}/head_attention.pc.in"
                 @ONLY)
  install(CODE "configure_file(\"${PROJECT_BINARY_DIR}/head_attention.pc.in\" \
\"${PROJECT_BINARY_DIR}/head_attention.pc\" @ONLY)")
else()
  # share/pkgconfig -> ../..
  file(RELATIVE_PATH _head_attention_pc_up "/prefix/${HEAD_ATTENTION_INSTALL_PKGCONFIGDIR}" "/prefix")
  string(REGEX REPLACE "/$" "" _head_attention_pc_up "${_head_attention_pc_up}")
  set(HEAD_ATTENTION_PC_PREFIX "\${pcfiledir}/${_head_attention_pc_up}")
  unset(_head_attention_pc_up)
  configure_file("${CMAKE_CURRENT_LIST_DIR}/head_attention.pc.in" "${PROJECT_BINARY_DIR}/head_attention.pc" @ONLY)
endif()
install(FILES "${PROJECT_BINARY_DIR}/head_attention.pc" DESTINATION "${HEAD_ATTENTION_INSTALL_PKGCONFIGDIR}")

# The license, README and changelog, in the documentation directory (<prefix>/share/doc/HeadAttention by default).
install(FILES "${PROJECT_SOURCE_DIR}/LICENSE" "${PROJECT_SOURCE_DIR}/README.md" "${PROJECT_SOURCE_DIR}/CHANGELOG.md"
        DESTINATION "${CMAKE_INSTALL_DOCDIR}")

# Binary packages of all of the above (cpack -G DEB, cpack -G TGZ).
include("${CMAKE_CURRENT_LIST_DIR}/package.cmake")
