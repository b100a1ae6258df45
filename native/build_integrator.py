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

# Must match integrator.h; API mode makes the compiler check that it does.
CDEF = """
enum { INTEG_OK = 0, INTEG_EINVAL = -1, INTEG_ENOMEM = -2 };
enum { INTEG_RATE = 0, INTEG_STATE = 1, INTEG_EVENTS = 2, INTEG_TANK = 3 };
typedef struct integ integ_t;
typedef struct {
    int32_t kind;
    int32_t n_states;
    double max_gap;
    double scale;
    double k;
    double dead_time;
    double volume_m3;
    double r_specific;
    double p_pc;
    double t_pc;
    double refuel_kg;
} integ_spec_t;
typedef struct {
    int32_t channel;
    double mj_per_unit;
    double kg_co2_per_mj;
} integ_fuel_t;
typedef struct {
    double integral;
    double covered_s;
    double longest_gap_s;
    double last;
    int64_t gaps;
    int64_t events;
} integ_cw_t;
typedef struct {
    double energy_mj;
    double co2_kg;
} integ_fw_t;
typedef struct {
    int64_t rejected;
    int64_t late_gaps;
    int64_t late_points;
    int64_t skipped_windows;
    double late_s;
} integ_counters_t;
integ_t *integ_new(int32_t n_channels, const integ_spec_t *specs, int32_t n_fuels,
                   const integ_fuel_t *fuels, double period, double origin, int64_t max_windows,
                   int *err);
void integ_free(integ_t *h);
int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done);
int integ_push_one(integ_t *h, int32_t channel, double t, double v, int valid);
int integ_push_events(integ_t *h, int32_t channel, const double *t, const double *pulse,
                      const double *pressure, const double *temperature, const uint8_t *valid,
                      int64_t n, int64_t *done);
int integ_push_tank(integ_t *h, int32_t channel, const double *t, const double *pressure,
                    const double *temperature, const uint8_t *valid, int64_t n, int64_t *done);
int64_t integ_pop(integ_t *h, double watermark);
int64_t integ_flush(integ_t *h);
const int64_t *integ_out_index(const integ_t *h);
const integ_cw_t *integ_out_channels(const integ_t *h);
const double *integ_out_states(const integ_t *h);
const integ_fw_t *integ_out_fuels(const integ_t *h);
void integ_out_release(integ_t *h);
int32_t integ_state_slots(const integ_t *h);
void integ_totals(const integ_t *h, double *out);
void integ_rejected(const integ_t *h, int64_t *out);
void integ_counters(const integ_t *h, integ_counters_t *out);
int64_t integ_pending_windows(const integ_t *h);
double integ_lateness(const integ_t *h);
double integ_dak_z(double p_pr, double t_pr);
double integ_tank_mass(double pressure_bar, double temperature_k, double volume_m3,
                       double r_specific, double p_pc, double t_pc);
"""


def _rel(path: str) -> str:
    # Relative to the working directory, as setuptools wants extension sources
    # ("native/integrator.c" from the root), without assuming the cwd is the root.
    return os.path.relpath(os.path.join(_HERE, path))


# CNGMRV_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer
# (native/sanitize.py builds such a variant aside and runs the tests against it).
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
    builder.cdef(CDEF)
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
