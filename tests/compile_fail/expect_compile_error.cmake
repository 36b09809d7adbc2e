# cmake -DBUILD_DIR=... -DTARGET=... -DEXPECT=<regex> [-DMAX_ERRORS=n] [-DCONFIG=...] -P expect_compile_error.cmake
# Builds TARGET, which must fail to compile with a compiler message matching EXPECT (our static_assert's
# text) and, with MAX_ERRORS, print at most that many "error:" lines (the message alone, no cascade). A bare WILL_FAIL on the build would pass on any error at all, a typo in the test included; this
# passes only on the intended one.
set(config_args "")
if(CONFIG)
  set(config_args --config "${CONFIG}")
endif()
execute_process(
  COMMAND "${CMAKE_COMMAND}" --build "${BUILD_DIR}" --target "${TARGET}" ${config_args}
  RESULT_VARIABLE result
  OUTPUT_VARIABLE output
  ERROR_VARIABLE output)
if(result EQUAL 0)
  message(FATAL_ERROR "${TARGET} compiled, but must not")
endif()
if(NOT output MATCHES "${EXPECT}")
  message(FATAL_ERROR "${TARGET} failed to compile, but without the expected message '${EXPECT}':\n${output}")
endif()
if(MAX_ERRORS)
  string(REGEX MATCHALL "error:" errors "${output}")
  list(LENGTH errors error_count)
  if(error_count GREATER MAX_ERRORS)
    message(FATAL_ERROR "${TARGET}: ${error_count} errors, more than ${MAX_ERRORS}: a cascade after the message:\n${output}")
  endif()
endif()
message(STATUS "${TARGET}: refused at compile time with '${EXPECT}'")
