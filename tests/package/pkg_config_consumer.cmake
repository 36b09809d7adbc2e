# cmake -DPKG_CONFIG=... -DPKG_CONFIG_DIR=... -DEXPECTED_INCLUDEDIR=... -DCXX=... -DSOURCE=... -DOUTPUT=...
#       -P pkg_config_consumer.cmake
# Builds SOURCE with only the flags `pkg-config --cflags --libs head_attention` gives (plus warnings as errors)
# and runs it: the .pc file alone must supply the include paths, Eigen (through Requires) and C++17.

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
string(FIND " ${flags} " " -I${EXPECTED_INCLUDEDIR} " position)
if(position EQUAL -1)
  message(FATAL_ERROR "the flags lack -I${EXPECTED_INCLUDEDIR}")
endif()

separate_arguments(flags UNIX_COMMAND "${flags}")
get_filename_component(output_dir "${OUTPUT}" DIRECTORY)
file(MAKE_DIRECTORY "${output_dir}")
execute_process(COMMAND "${CXX}" -Wall -Wextra -Wpedantic -Werror "${SOURCE}" -o "${OUTPUT}" ${flags}
                RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "compiling ${SOURCE} with the pkg-config flags failed")
endif()
execute_process(COMMAND "${OUTPUT}" RESULT_VARIABLE result)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "${OUTPUT} failed: ${result}")
endif()
