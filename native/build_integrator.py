"""cffi builder for ``cngmrv.native._integrator`` (API / out-of-line mode).

Used by ``setup.py`` through ``cffi_modules``; setuptools runs it from the
repository (or sdist) root, so source paths are given relative to that root.
"""

from __future__ import annotations

import os
import sys

from cffi import FFI

_HERE = os.path.dirname(os.path.abspath(__file__))

# Must match integrator.h; API mode makes the compiler check that it does.
CDEF = """
enum { INTEG_OK = 0, INTEG_EINVAL = -1, INTEG_ENOMEM = -2 };
typedef struct integ integ_t;
typedef struct {
    double integral;
    double covered_s;
    double longest_gap_s;
    int64_t gaps;
} integ_cw_t;
typedef struct {
    int64_t rejected;
    int64_t late_gaps;
    int64_t skipped_windows;
    double late_s;
} integ_counters_t;
integ_t *integ_new(int32_t n_channels, const double *max_gap, const double *scale,
                   double period, double origin, int64_t max_windows, int *err);
void integ_free(integ_t *h);
int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done);
int integ_push_one(integ_t *h, int32_t channel, double t, double v, int valid);
int64_t integ_pop(integ_t *h, double watermark);
int64_t integ_flush(integ_t *h);
const int64_t *integ_out_index(const integ_t *h);
const integ_cw_t *integ_out_channels(const integ_t *h);
void integ_out_release(integ_t *h);
void integ_totals(const integ_t *h, double *out);
void integ_counters(const integ_t *h, integ_counters_t *out);
int64_t integ_pending_windows(const integ_t *h);
double integ_lateness(const integ_t *h);
"""


def _rel(path: str) -> str:
    # Relative to the working directory, as setuptools wants extension sources
    # ("native/integrator.c" from the root), without assuming the cwd is the root.
    return os.path.relpath(os.path.join(_HERE, path))


if sys.platform == "win32":
    _CFLAGS: list[str] = []
    _LIBS: list[str] = []
else:
    # -ffp-contract=off: no fused multiply-add (aarch64, clang), so the C result
    # stays bit-identical to the Python oracle in native/reference.py.
    _CFLAGS = ["-O2", "-std=c99", "-Wall", "-Wextra", "-ffp-contract=off"]
    _LIBS = ["m"]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "cngmrv.native._integrator",
    '#include "integrator.h"\n',
    sources=[_rel("integrator.c")],
    include_dirs=[_rel(".")],
    depends=[_rel("integrator.h")],
    extra_compile_args=_CFLAGS,
    libraries=_LIBS,
)
