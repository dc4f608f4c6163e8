# CUTLASS/CuTe headers come from the pinned PyPI wheel nvidia-cutlass==4.2.0.0 (never vendored).
# setup.py passes FLASHSEEK_CUTLASS_INCLUDES; a plain CMake configure asks Python for them.
function(flashseek_find_cutlass)
  if(NOT FLASHSEEK_CUTLASS_INCLUDES)
    execute_process(
      COMMAND ${Python_EXECUTABLE} -c
        "import cutlass_library, pathlib; s = pathlib.Path(cutlass_library.__file__).parent / 'source'; print(f\"{s / 'include'};{s / 'tools' / 'util' / 'include'}\")"
      OUTPUT_VARIABLE _inc OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE _rc)
    if(NOT _rc EQUAL 0)
      message(FATAL_ERROR "flashseek: install the CUTLASS headers with `pip install nvidia-cutlass==4.2.0.0`")
    endif()
    set(FLASHSEEK_CUTLASS_INCLUDES ${_inc})
  endif()
  list(GET FLASHSEEK_CUTLASS_INCLUDES 0 _first)
  if(NOT EXISTS ${_first}/cute/tensor.hpp)
    message(FATAL_ERROR "flashseek: CUTLASS headers not found at ${_first}")
  endif()
  set(FLASHSEEK_CUTLASS_INCLUDES ${FLASHSEEK_CUTLASS_INCLUDES} PARENT_SCOPE)
endfunction()
