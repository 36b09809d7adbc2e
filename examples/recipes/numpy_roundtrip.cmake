# cmake -DPYTHON3=... -DWRITER=write_safetensors.py -DLOADER=pytorch_weights -DFILE=out.safetensors -DPREFIX=...
#       -P numpy_roundtrip.cmake
# The recipe's two halves in turn: the numpy-only writer writes a MultiHeadAttention state_dict under PREFIX, then
# the C++ recipe loads it. Prints "SKIPPED: numpy not found" (the test's skip expression) when the writer exits 77.
execute_process(COMMAND "${PYTHON3}" "${WRITER}" "${FILE}" "${PREFIX}" RESULT_VARIABLE result OUTPUT_VARIABLE output
                ERROR_VARIABLE output)
message("${output}")
if(result EQUAL 77)
  message("SKIPPED: numpy not found for ${PYTHON3}")
  return()
elseif(NOT result EQUAL 0)
  message(FATAL_ERROR "${WRITER} failed (${result})")
endif()
execute_process(COMMAND "${LOADER}" "${FILE}" "${PREFIX}" RESULT_VARIABLE result OUTPUT_VARIABLE output
                ERROR_VARIABLE output)
message("${output}")
if(NOT result EQUAL 0)
  message(FATAL_ERROR "${LOADER} failed (${result})")
endif()
