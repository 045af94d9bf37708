"""The operators CMakeLists.txt declares, one `mlx_ext_add_operator(<op> ...)`
call each (cmake/operator.cmake says what each argument holds), read so that
tests find every operator's sources rather than naming the quantized matmul's.

    for op in declared_operators():
        op.name, op.files("ISA_SOURCES")   # "quantized_matmul", [Path(".../cpu_kernels.cpp")]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CMAKE_LISTS = REPO / "CMakeLists.txt"
# The multi-value arguments of mlx_ext_add_operator.
KEYWORDS = ("SOURCES", "ISA_SOURCES", "METAL_SOURCES", "CUDA_SOURCES", "CUDA_KERNELS", "CUDA_KERNELS_SM90A")


@dataclass(frozen=True)
class Operator:
    name: str
    arguments: dict[str, tuple[str, ...]]  # keyword -> its values, as written

    def files(self, keyword: str) -> list[Path]:
        """The files of a *_SOURCES argument: csrc/<op>/<value>."""
        assert keyword.endswith("SOURCES"), f"{keyword} names no files"
        return [REPO / "csrc" / self.name / value for value in self.arguments.get(keyword, ())]


def declared_operators(cmake_lists: Path = CMAKE_LISTS) -> list[Operator]:
    text = re.sub(r"#[^\n]*", "", cmake_lists.read_text())
    operators = []
    for call in re.findall(r"\bmlx_ext_add_operator\s*\(([^)]*)\)", text):
        name, *words = call.split()
        arguments, keyword = {}, None
        for word in words:
            if word in KEYWORDS:
                keyword = word
                arguments[keyword] = ()
            else:
                assert keyword, f"{cmake_lists}: mlx_ext_add_operator({name} ...): {word} before any keyword"
                arguments[keyword] += (word,)
        operators.append(Operator(name, arguments))
    return operators
