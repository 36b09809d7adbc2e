# cmake -DVERSION=<PROJECT_VERSION> -DSOURCE_DIR=... [-DBINARY_DIR=...] -P check_version.cmake
# The version lives in one place, project(VERSION) in CMakeLists.txt, passed here as VERSION; everything else that
# states it must agree: the macros of include/head_attention/version.hpp (kept by hand, so that the headers work
# without CMake too), CHANGELOG.md (a section "## [VERSION] - <date>"), and, with BINARY_DIR (a build with the
# install rules), the package version file and the pkg-config template, both generated from PROJECT_VERSION. The
# Debian package's control field is checked by package.deb, the Doxygen PROJECT_NUMBER is configured from it too.

file(STRINGS "${SOURCE_DIR}/include/head_attention/version.hpp" defines
     REGEX "^#define HEAD_ATTENTION_VERSION_(MAJOR|MINOR|PATCH) ")
set(header_version "")
foreach(part MAJOR MINOR PATCH)
  set(value "")
  foreach(line IN LISTS defines)
    if(line MATCHES "^#define HEAD_ATTENTION_VERSION_${part} +([0-9]+)$")
      set(value "${CMAKE_MATCH_1}")
    endif()
  endforeach()
  if(value STREQUAL "")
    message(FATAL_ERROR "version.hpp: no HEAD_ATTENTION_VERSION_${part} <number>")
  endif()
  list(APPEND header_version "${value}")
endforeach()
string(REPLACE ";" "." header_version "${header_version}")

set(problems "")
if(NOT header_version STREQUAL VERSION)
  string(APPEND problems "\n  include/head_attention/version.hpp says ${header_version}")
endif()

file(STRINGS "${SOURCE_DIR}/CHANGELOG.md" changelog REGEX "^## \\[")
string(REPLACE "." "\\." version_regex "${VERSION}")
if(NOT changelog MATCHES "(^|;)## \\[${version_regex}\\] - [0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]")
  string(APPEND problems "\n  CHANGELOG.md has no section \"## [${VERSION}] - <YYYY-MM-DD>\"")
endif()

if(BINARY_DIR)
  file(STRINGS "${BINARY_DIR}/HeadAttentionConfigVersion.cmake" line REGEX "^set\\(PACKAGE_VERSION ")
  if(NOT line MATCHES "^set\\(PACKAGE_VERSION \"${version_regex}\"\\)$")
    string(APPEND problems "\n  HeadAttentionConfigVersion.cmake: ${line}")
  endif()
  # head_attention.pc, or its template when the prefix is filled in at install time (cmake/install.cmake).
  set(pc "${BINARY_DIR}/head_attention.pc")
  if(NOT EXISTS "${pc}")
    set(pc "${BINARY_DIR}/head_attention.pc.in")
  endif()
  file(STRINGS "${pc}" line REGEX "^Version: ")
  if(NOT line STREQUAL "Version: ${VERSION}")
    string(APPEND problems "\n  head_attention.pc: ${line}")
  endif()
endif()

if(problems)
  message(FATAL_ERROR "project(VERSION) is ${VERSION}, but:${problems}")
endif()
if(BINARY_DIR)
  message(STATUS "version ${VERSION}: version.hpp, CHANGELOG.md, HeadAttentionConfigVersion.cmake and head_attention.pc agree")
else()
  message(STATUS "version ${VERSION}: version.hpp and CHANGELOG.md agree")
endif()
