# cmake -DEXPORT=<safetensors_export> -DPYTHON=<python3 with torch> -DSCRIPT=<generate_safetensors.py> -DDIR=<dir>
#       -P safetensors_pytorch_check.cmake
# Files written by head_attention::save_state_dict must load into simple_llm's PyTorch modules with
# load_state_dict(strict=True) and give our outputs: EXPORT writes them (and prints one line per file,
# "<file> <kind> <sizes...>"), `SCRIPT --check` loads each in PyTorch and compares. Prints "SKIPPED: ..." and
# passes (the test's SKIP_REGULAR_EXPRESSION) when PYTHON cannot import torch and numpy.

if(NOT EXISTS "${PYTHON}")
  message("SKIPPED: no Python at '${PYTHON}' (set HEAD_ATTENTION_TORCH_PYTHON)")
  return()
endif()
execute_process(COMMAND "${PYTHON}" -c "import torch, numpy" RESULT_VARIABLE result OUTPUT_QUIET ERROR_QUIET)
if(NOT result EQUAL 0)
  message("SKIPPED: ${PYTHON} cannot import torch and numpy")
  return()
endif()

file(REMOVE_RECURSE "${DIR}")
file(MAKE_DIRECTORY "${DIR}")
execute_process(COMMAND "${EXPORT}" "${DIR}" RESULT_VARIABLE result OUTPUT_VARIABLE listing)
if(NOT result EQUAL 0)
  message(FATAL_ERROR "${EXPORT} ${DIR} failed: ${result}")
endif()

string(REPLACE "\n" ";" lines "${listing}")
set(checked 0)
set(failed 0)
foreach(line IN LISTS lines)
  if(line STREQUAL "")
    continue()
  endif()
  separate_arguments(arguments UNIX_COMMAND "${line}")
  execute_process(COMMAND "${PYTHON}" "${SCRIPT}" --check ${arguments} RESULT_VARIABLE result)
  math(EXPR checked "${checked} + 1")
  if(NOT result EQUAL 0)
    math(EXPR failed "${failed} + 1")
  endif()
endforeach()
if(checked EQUAL 0 OR NOT failed EQUAL 0)
  message(FATAL_ERROR "PyTorch check of saved safetensors files: ${failed} of ${checked} failed")
endif()
message(STATUS "PyTorch check of saved safetensors files: all ${checked} passed")
