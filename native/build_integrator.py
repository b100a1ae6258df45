"""cffi builder for ``cngmrv.native._integrator`` (API / out-of-line mode).

Used by ``setup.py`` through ``cffi_modules``; setuptools runs it from the
repository (or sdist) root, so source paths are given relative to that root.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))


def header_cdef() -> str:
    """The declarations of integrator.h, for ``cdef``: the header is the one source.

    cffi's parser takes C comments but no preprocessor lines, so those (the
    include guard and ``#include <stdint.h>``) are dropped.
    """
    with open(os.path.join(_HERE, "integrator.h"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    return "\n".join(line for line in lines if not line.lstrip().startswith("#"))


def _rel(path: str) -> str:
    # Relative to the working directory, as setuptools wants extension sources
    # ("native/integrator.c" from the root), without assuming the cwd is the root.
    return os.path.relpath(os.path.join(_HERE, path))


# CNGMRV_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
# (tests/sanitize_native.py builds such a variant aside and runs the tests against it).
SANITIZE_FLAGS = [
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
]


def sanitize_requested() -> bool:
    return os.environ.get("CNGMRV_SANITIZE", "") not in ("", "0")


def make_builder(path: Callable[[str], str] = _rel, sanitize: bool = False) -> FFI:
    """The cffi builder; ``path`` maps a file name in native/ to the path to compile."""
    if sys.platform == "win32":
        cflags: list[str] = []
        ldflags: list[str] = []
        libs: list[str] = []
    else:
        # -ffp-contract=off: no fused multiply-add (aarch64, clang), so the C result
        # stays bit-identical to the Python oracle in native/reference.py.
        cflags = ["-O2", "-std=c99", "-Wall", "-Wextra", "-ffp-contract=off"]
        ldflags = []
        libs = ["m"]
        if sanitize:
            cflags += SANITIZE_FLAGS
            ldflags += SANITIZE_FLAGS
    builder = FFI()
    builder.cdef(header_cdef())
    builder.set_source(
        "cngmrv.native._integrator",
        '#include "integrator.h"\n',
        sources=[path("integrator.c")],
        include_dirs=[path(".")],
        depends=[path("integrator.h")],
        extra_compile_args=cflags,
        extra_link_args=ldflags,
        libraries=libs,
    )
    return builder


ffibuilder = make_builder(sanitize=sanitize_requested())
