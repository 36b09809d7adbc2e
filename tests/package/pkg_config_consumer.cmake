# cmake -DPKG_CONFIG=... -DPKG_CONFIG_DIR=... -DEXPECTED_INCLUDEDIR=... -DCXX=... -DCXX17_OPTION=-std=c++17
#       [-DCXX20_OPTION=-std=c++20] [-DWERROR=ON] -DSOURCE=... -DOUTPUT=... -P pkg_config_consumer.cmake
# Builds SOURCE with nothing but a -std= option and the flags `pkg-config --cflags --libs head_attention` gives
# (plus warnings, as errors with WERROR), and runs it: the .pc file alone must supply the include paths, Eigen
# (through Requires) and OpenMP. The standard is the user's: the flags must hold no -std= option, SOURCE is built as
# C++17 (the minimum) and, when CXX20_OPTION is given, as C++20, and it #errors if __cplusplus comes out below the
# standard asked for (the -std= option goes first, so a -std= from pkg-config would win and be caught).

set(ENV{PKG_CONFIG_PATH} "${PKG_CONFIG_DIR}")
execute_process(
  COMMAND "${PKG_CONFIG}" --cflags --libs head_attention
  OUTPUT_VARIABLE flags
  RESULT_VARIABLE result
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "pkg-config --cflags --libs head_attention failed (PKG_CONFIG_PATH=${PKG_CONFIG_DIR})")
endif()
message(STATUS "pkg-config --cflags --libs head_attention: ${flags}")
# The .pc file finds its prefix from its own place (prefix=${pcfiledir}/../..), so the include path comes as
# <pkgconfigdir>/../../include: compare resolved paths.
get_filename_component(expected_includedir "${EXPECTED_INCLUDEDIR}" REALPATH)
string(REGEX MATCHALL "(^| )-I[^ ]+" include_flags "${flags}")
set(found_includedir FALSE)
foreach(include_flag IN LISTS include_flags)
  string(REGEX REPLACE "^ ?-I" "" include_dir "${include_flag}")
  get_filename_component(include_dir "${include_dir}" REALPATH)
  if(include_dir STREQUAL expected_includedir)
    set(found_includedir TRUE)
  endif()
endforeach()
if(NOT found_includedir)
  message(FATAL_ERROR "the flags lack -I${EXPECTED_INCLUDEDIR} (or a path to it)")
endif()
string(REGEX MATCH "(^| )[-/]std[=:][^ ]*" std_flag "${flags}")
string(STRIP "${std_flag}" std_flag)
if(std_flag)
  message(FATAL_ERROR "the flags set the C++ standard (${std_flag}): that is the user's choice")
endif()

separate_arguments(flags UNIX_COMMAND "${flags}")
set(warnings -Wall -Wextra -Wpedantic)
if(WERROR)
  list(APPEND warnings -Werror)
endif()
# <option>:<lowest __cplusplus>. 201709L is C++20 as GCC 10 and the -std=c++2a drafts report it (202002L from
# GCC 11 and Clang 10 on); any C++17 build reports 201703L.
set(builds "${CXX17_OPTION}:201703L")
if(CXX20_OPTION)
  list(APPEND builds "${CXX20_OPTION}:201709L")
endif()

get_filename_component(output_dir "${OUTPUT}" DIRECTORY)
file(MAKE_DIRECTORY "${output_dir}")
foreach(build IN LISTS builds)
  string(REPLACE ":" ";" build "${build}")
  list(GET build 0 std_option)
  list(GET build 1 expected)
  string(REGEX REPLACE "[^a-z0-9+]" "" suffix "${std_option}")
  set(output "${OUTPUT}-${suffix}")
  execute_process(
    COMMAND "${CXX}" ${std_option} ${warnings} "-DCONSUMER_EXPECTED_CPLUSPLUS=${expected}" "${SOURCE}" -o "${output}"
            ${flags}
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "compiling ${SOURCE} with ${std_option} and the pkg-config flags failed")
  endif()
  execute_process(COMMAND "${output}" RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "${output} failed: ${result}")
  endif()
endforeach()
