# cmake -DCPACK=... -DDPKG=... -DDPKG_DEB=... -DBUILD_DIR=... -DWORK_DIR=... -DSOURCE_DIR=... -DVERSION=...
#       -DINCLUDEDIR=... -DCMAKEDIR=... -DPKGCONFIGDIR=... -DDOCDIR=... [-DSAFETENSORS=1] [-DCONFIG=...]
#       -P deb_check.cmake
# Builds the Debian package and the tarball of the build in BUILD_DIR with CPack (cpack -G DEB, -G TGZ, into
# WORK_DIR/out: the build directory's own files are not touched), checks the .deb's control fields (package name,
# Version = project(VERSION), Architecture: all, Depends on libeigen3-dev) and its file list (exactly the install
# tree under /usr: headers, CMake package files, the .pc file, license and docs; no executable file), checks that
# the tarball holds the same files, and installs the .deb with `dpkg --root=WORK_DIR/root -i` into a throwaway
# root: a fresh dpkg database of its own under WORK_DIR/root/var/lib/dpkg, so the real system's packages and
# database are never touched (--force-depends, since that database knows no libeigen3-dev; the consumers then
# use the system's Eigen). The consumer tests package.deb_find_package and package.deb_pkg_config build against
# WORK_DIR/root/usr.

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE result OUTPUT_VARIABLE output ERROR_VARIABLE error)
  if(NOT result EQUAL 0)
    string(REPLACE ";" " " command "${ARGV}")
    message(FATAL_ERROR "${command} failed (${result}):\n${output}${error}")
  endif()
  set(output "${output}" PARENT_SCOPE)
endfunction()

file(REMOVE_RECURSE "${WORK_DIR}")
set(config_args "")
if(CONFIG)
  set(config_args -C "${CONFIG}")
endif()
foreach(generator DEB TGZ)
  run("${CPACK}" --config "${BUILD_DIR}/CPackConfig.cmake" -G ${generator} -B "${WORK_DIR}/out" ${config_args})
endforeach()
set(deb "${WORK_DIR}/out/libhead-attention-dev_${VERSION}_all.deb")
set(tgz "${WORK_DIR}/out/head-attention-${VERSION}.tar.gz")
foreach(package "${deb}" "${tgz}")
  if(NOT EXISTS "${package}")
    file(GLOB made "${WORK_DIR}/out/*.*")
    message(FATAL_ERROR "cpack made no ${package}; it made: ${made}")
  endif()
  file(SIZE "${package}" size)
  message(STATUS "${package}: ${size} bytes")
endforeach()

# Control fields.
run("${DPKG_DEB}" --info "${deb}")
set(info "${output}")
foreach(field "Package: libhead-attention-dev" "Version: ${VERSION}" "Architecture: all"
              "Depends: libeigen3-dev (>= 3.4)" "Recommends: nlohmann-json3-dev" "Section: libdevel" "Maintainer: ")
  string(FIND "${info}" " ${field}" position)
  if(position EQUAL -1)
    message(FATAL_ERROR "dpkg-deb --info ${deb} lacks \"${field}\":\n${info}")
  endif()
endforeach()
string(REGEX MATCH "\n [A-Za-z-]*Depends: [^\n]*" depends "${info}")
if(depends MATCHES "libc6|libstdc|libgomp")
  message(FATAL_ERROR "the package depends on binaries' libraries:${depends}")
endif()

# File list: exactly the install tree, nothing executable.
set(expected "")
file(GLOB_RECURSE headers RELATIVE "${SOURCE_DIR}/include" "${SOURCE_DIR}/include/head_attention/*.hpp")
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

run("${DPKG_DEB}" --contents "${deb}")
string(REGEX REPLACE "\n$" "" listing "${output}")
string(REPLACE "\n" ";" listing "${listing}")
set(files "")
foreach(line IN LISTS listing)
  # -rw-r--r-- root/root      2185 2026-11-27 04:08 ./usr/include/head_attention/workspace.hpp
  if(line MATCHES "^([-dlrwxsStT]+) +[^ ]+ +[0-9]+ +[^ ]+ +[^ ]+ +\\./(.*)$")
    set(mode "${CMAKE_MATCH_1}")
    set(path "${CMAKE_MATCH_2}")
    if(mode MATCHES "^d")
      continue()
    endif()
    if(NOT mode MATCHES "^-rw-r--r--$")
      message(FATAL_ERROR "the package holds ${path} with mode ${mode}: only plain, non-executable files belong in it")
    endif()
    if(NOT path MATCHES "^usr/")
      message(FATAL_ERROR "the package holds ${path}, outside /usr")
    endif()
    string(REGEX REPLACE "^usr/" "" path "${path}")
    list(APPEND files "${path}")
  else()
    message(FATAL_ERROR "unexpected line in dpkg-deb --contents: ${line}")
  endif()
endforeach()
list(SORT files)
if(NOT files STREQUAL expected)
  string(REPLACE ";" "\n  " files_lines "${files}")
  string(REPLACE ";" "\n  " expected_lines "${expected}")
  message(FATAL_ERROR "the .deb holds, under /usr:\n  ${files_lines}\nexpected:\n  ${expected_lines}")
endif()
list(LENGTH files count)
message(STATUS "${deb}: ${count} files under /usr, as expected, none executable; control fields as expected")

# The tarball: the same files under head-attention-<version>/.
file(MAKE_DIRECTORY "${WORK_DIR}/tgz")
execute_process(COMMAND "${CMAKE_COMMAND}" -E tar xzf "${tgz}" WORKING_DIRECTORY "${WORK_DIR}/tgz"
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "cmake -E tar xzf ${tgz} failed: ${result}")
endif()
file(GLOB_RECURSE tgz_files RELATIVE "${WORK_DIR}/tgz/head-attention-${VERSION}"
     "${WORK_DIR}/tgz/head-attention-${VERSION}/*")
list(SORT tgz_files)
if(NOT tgz_files STREQUAL expected)
  string(REPLACE ";" "\n  " tgz_lines "${tgz_files}")
  message(FATAL_ERROR "${tgz} holds, under head-attention-${VERSION}/:\n  ${tgz_lines}")
endif()
message(STATUS "${tgz}: the same ${count} files under head-attention-${VERSION}/")

# dpkg -i into the throwaway root.
set(root "${WORK_DIR}/root")
file(MAKE_DIRECTORY "${root}/var/lib/dpkg/info" "${root}/var/lib/dpkg/updates")
file(TOUCH "${root}/var/lib/dpkg/status")
run("${DPKG}" "--root=${root}" "--log=${WORK_DIR}/dpkg.log" --force-depends --force-not-root --install "${deb}")
run("${DPKG}" "--root=${root}" --status libhead-attention-dev)
if(NOT output MATCHES "\nStatus: install ok installed\n")
  message(FATAL_ERROR "dpkg --root=${root} --status libhead-attention-dev:\n${output}")
endif()
message(STATUS "dpkg --root=${root} -i: libhead-attention-dev ${VERSION} installed (install ok installed)")
