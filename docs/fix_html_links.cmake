# cmake -DHTML_DIR=<build>/docs/html -DSOURCE_DIR=<repository> -P fix_html_links.cmake
# The guide's pages link each other as GitHub reads them, page.md#heading-anchor. Doxygen 1.9 turns a link to
# page.md into its HTML page, but leaves page.md#anchor as it is, which the site does not have: point each such
# link at the page's HTML file (md_docs_<page>.html, "-" as "_"), dropping the anchor (Doxygen's own heading
# anchors are not GitHub's). An image a page takes from elsewhere in the repository (src="../examples/x.svg")
# is copied next to the pages.
cmake_minimum_required(VERSION 3.16)
file(GLOB pages "${HTML_DIR}/md_*.html" "${HTML_DIR}/index.html")
foreach(page IN LISTS pages)
  file(READ "${page}" html)
  string(REGEX MATCHALL "src=\"\\.\\./[^\"]+\"" images "${html}")
  foreach(image IN LISTS images)
    string(REGEX REPLACE "^src=\"\\.\\./(.*)\"$" "\\1" path "${image}")
    get_filename_component(name "${path}" NAME)
    file(COPY "${SOURCE_DIR}/${path}" DESTINATION "${HTML_DIR}")
    string(REPLACE "${image}" "src=\"${name}\"" html "${html}")
  endforeach()
  string(REGEX MATCHALL "href=\"[a-z0-9_-]+\\.md#[^\"]*\"" links "${html}")
  list(REMOVE_DUPLICATES links)
  foreach(link IN LISTS links)
    string(REGEX REPLACE "^href=\"([a-z0-9_-]+)\\.md#.*$" "\\1" name "${link}")
    string(REPLACE "-" "_" name "${name}")
    string(REPLACE "${link}" "href=\"md_docs_${name}.html\"" html "${html}")
  endforeach()
  file(WRITE "${page}" "${html}")
endforeach()
