# cmake -DDOXYGEN=... -DDOXYFILE=... -DHTML_DIR=... -P check_docs.cmake
# Runs Doxygen on the configured Doxyfile and fails on any warning (an undocumented public symbol, a broken
# reference, ...), printing them all and their count; then checks the result: no page for head_attention::detail,
# the main page holds the README text it includes (Doxygen drops an included block it cannot use, e.g. one
# that starts with a heading, without a warning), and every guide page of docs/ has its HTML page.

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

# The guide's page.md#anchor links, pointed at their HTML pages (as the head_attention_docs target does).
get_filename_component(source_dir "${CMAKE_CURRENT_LIST_DIR}" DIRECTORY)
execute_process(COMMAND "${CMAKE_COMMAND}" "-DHTML_DIR=${HTML_DIR}" "-DSOURCE_DIR=${source_dir}" -P
                        "${CMAKE_CURRENT_LIST_DIR}/fix_html_links.cmake" RESULT_VARIABLE fixed)
if(NOT fixed EQUAL 0)
  message(FATAL_ERROR "fix_html_links.cmake failed")
endif()
file(GLOB html_pages "${HTML_DIR}/*.html")
foreach(html_page IN LISTS html_pages)
  file(READ "${html_page}" html)
  if(html MATCHES "href=\"[a-z0-9_-]+\\.md[#\"]")
    message(FATAL_ERROR "${html_page} links a .md file the site does not have: ${CMAKE_MATCH_0}")
  endif()
endforeach()

file(GLOB detail_pages "${HTML_DIR}/*detail*")
if(detail_pages)
  message(FATAL_ERROR "head_attention::detail has pages in the reference: ${detail_pages}")
endif()
file(READ "${HTML_DIR}/index.html" index)
# One phrase from each README block the main page includes (intro, quick start).
foreach(phrase "header-only C++17 library" "head_attention_quickstart")
  string(FIND "${index}" "${phrase}" position)
  if(position EQUAL -1)
    message(FATAL_ERROR "the main page (${HTML_DIR}/index.html) lacks the README's \"${phrase}\"")
  endif()
endforeach()
# Each guide page becomes md_docs_<name>.html (Doxygen names a Markdown page after its path, "-" as "_").
get_filename_component(docs_dir "${CMAKE_CURRENT_LIST_FILE}" DIRECTORY)
file(GLOB guide "${docs_dir}/*.md")
foreach(md IN LISTS guide)
  get_filename_component(name "${md}" NAME_WE)
  if(name STREQUAL "mainpage")
    continue()
  endif()
  string(REPLACE "-" "_" doxygen_name "${name}")
  if(NOT EXISTS "${HTML_DIR}/md_docs_${doxygen_name}.html")
    message(FATAL_ERROR "the guide page docs/${name}.md has no HTML page in ${HTML_DIR}")
  endif()
endforeach()
file(GLOB pages "${HTML_DIR}/*.html")
list(LENGTH pages page_count)
message(STATUS "${page_count} HTML pages in ${HTML_DIR}, none for detail::, main page with the README's blocks, every guide page")
