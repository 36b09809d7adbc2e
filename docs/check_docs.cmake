# cmake -DDOXYGEN=... -DDOXYFILE=... -DHTML_DIR=... -P check_docs.cmake
# Runs Doxygen on the configured Doxyfile and fails on any warning (an undocumented public symbol, a broken
# reference, ...), printing them all and their count; then checks the result: no page for head_attention::detail,
# and the main page holds the README text it includes (Doxygen drops an included block it cannot use, e.g. one
# that starts with a heading, without a warning).

execute_process(
  COMMAND "${DOXYGEN}" --version
  OUTPUT_VARIABLE version
  OUTPUT_STRIP_TRAILING_WHITESPACE)
get_filename_component(work_dir "${DOXYFILE}" DIRECTORY)
file(REMOVE_RECURSE "${HTML_DIR}")
execute_process(
  COMMAND "${DOXYGEN}" "${DOXYFILE}"
  WORKING_DIRECTORY "${work_dir}"
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE warnings)
# With WARN_AS_ERROR, Doxygen labels its warnings "error:"; count both spellings.
string(REGEX MATCHALL "(^|\n)[^\n]*: (warning|error): " found "${warnings}")
list(LENGTH found count)
message(STATUS "doxygen ${version}: ${count} warnings")
if(NOT count EQUAL 0 OR NOT result EQUAL 0)
  message(FATAL_ERROR "doxygen ${version} exited with ${result} after ${count} warnings:\n${warnings}${output}")
endif()

file(GLOB detail_pages "${HTML_DIR}/*detail*")
if(detail_pages)
  message(FATAL_ERROR "head_attention::detail has pages in the reference: ${detail_pages}")
endif()
file(READ "${HTML_DIR}/index.html" index)
# One phrase from each README block the main page includes (intro, quick start, semantics).
foreach(phrase "header-only C++17 library" "head_attention_quickstart" "computed stably")
  string(FIND "${index}" "${phrase}" position)
  if(position EQUAL -1)
    message(FATAL_ERROR "the main page (${HTML_DIR}/index.html) lacks the README's \"${phrase}\"")
  endif()
endforeach()
file(GLOB pages "${HTML_DIR}/*.html")
list(LENGTH pages page_count)
message(STATUS "${page_count} HTML pages in ${HTML_DIR}, none for detail::, main page with the README's blocks")
