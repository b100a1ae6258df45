/*
 * cngmrv fuel-mix integrator: windowed integration of sampled flows, states,
 * gas-injection events and tank readings, with explicit coverage and gaps.
 * Plain C99, no I/O, no clock: time comes only from the samples, so results
 * are reproducible.  Semantics are specified in docs/integrator.md;
 * native/reference.py is the executable oracle and must stay bit-for-bit in
 * step with this file.
 *
 * Thread safety: none.  One integ_t belongs to one caller at a time.
 * Caller buffers are read during the call only and never retained.
 */
#ifndef CNGMRV_INTEGRATOR_H
#define CNGMRV_INTEGRATOR_H

#include <stdint.h>

enum {
    INTEG_OK = 0,
    INTEG_EINVAL = -1, /* bad argument (construction, channel index or kind, watermark) */
    INTEG_ENOMEM = -2  /* allocation failed; state is as before the failing sample/call */
};

/* Channel kinds (docs/integrator.md section 2). */
enum { INTEG_RATE = 0, INTEG_STATE = 1, INTEG_EVENTS = 2, INTEG_TANK = 3 };

typedef struct integ integ_t;

/* One channel's configuration; fields not used by its kind are ignored. */
typedef struct {
    int32_t kind;
    int32_t n_states;  /* STATE: named states (>= 1); codes outside become "other" */
    double max_gap;    /* all: longest covered span, seconds, finite, >= 0 */
    double scale;      /* RATE: multiplies every value, finite */
    double k;          /* EVENTS: mass = k * max(pulse - dead_time, 0) * P / sqrt(T) */
    double dead_time;  /* EVENTS: same unit as pulse */
    double volume_m3;  /* TANK: water volume */
    double r_specific; /* TANK: specific gas constant, J/(kg K) */
    double p_pc;       /* TANK: pseudo-critical pressure, bar */
    double t_pc;       /* TANK: pseudo-critical temperature, K */
    double refuel_kg;  /* TANK: mass rise that starts a refuel */
} integ_spec_t;

/* energy_mj = integral(channel) * mj_per_unit; co2_kg = energy_mj * kg_co2_per_mj. */
typedef struct {
    int32_t channel; /* a RATE or EVENTS channel */
    double mj_per_unit;
    double kg_co2_per_mj;
} integ_fuel_t;

/* One channel's result for one emitted window. */
typedef struct {
    double integral;      /* RATE: sum v*scale*dt; EVENTS: kg injected; TANK: kg refuelled */
    double covered_s;     /* seconds of covered spans */
    double longest_gap_s; /* longest gap recorded in the window (0 if none) */
    double last;          /* TANK: mass at the last valid sample; NaN if none or other kind */
    int64_t gaps;         /* gaps recorded in the window */
    int64_t events;       /* EVENTS: valid events; TANK: refuels started */
} integ_cw_t;

typedef struct {
    double energy_mj;
    double co2_kg;
} integ_fw_t;

typedef struct {
    int64_t rejected;        /* non-finite t, t out of range, or t <= previous t */
    int64_t late_gaps;       /* gaps that ended in an already-closed window */
    int64_t late_points;     /* events / tank samples whose window was already closed */
    int64_t skipped_windows; /* empty windows not emitted because of max_windows */
    double late_s;           /* covered seconds that fell in already-closed windows */
} integ_counters_t;

/* Returns NULL and sets *err on failure (INTEG_EINVAL for a bad configuration). */
integ_t *integ_new(int32_t n_channels, const integ_spec_t *specs, int32_t n_fuels,
                   const integ_fuel_t *fuels, double period, double origin, int64_t max_windows,
                   int *err);
void integ_free(integ_t *h);

/* Feed n samples of one channel; *done receives how many were consumed (all
 * of them unless INTEG_ENOMEM).  integ_push/integ_push_one: RATE and STATE
 * channels; integ_push_events: EVENTS; integ_push_tank: TANK. */
int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done);
int integ_push_one(integ_t *h, int32_t channel, double t, double v, int valid);
int integ_push_events(integ_t *h, int32_t channel, const double *t, const double *pulse,
                      const double *pressure, const double *temperature, const uint8_t *valid,
                      int64_t n, int64_t *done);
int integ_push_tank(integ_t *h, int32_t channel, const double *t, const double *pressure,
                    const double *temperature, const uint8_t *valid, int64_t n, int64_t *done);

/* Close windows and stage them for reading.  Returns the number of staged
 * windows (>= 0) or an INTEG_E* code.  Staged windows stay readable through
 * integ_out_* until the next pop/flush/release. */
int64_t integ_pop(integ_t *h, double watermark);
int64_t integ_flush(integ_t *h);
const int64_t *integ_out_index(const integ_t *h);
const integ_cw_t *integ_out_channels(const integ_t *h); /* [window * n_channels + channel] */
const double *integ_out_states(const integ_t *h);       /* [window * n_state_slots + slot] */
const integ_fw_t *integ_out_fuels(const integ_t *h);    /* [window * n_fuels + fuel] */
void integ_out_release(integ_t *h);

/* Per-window state slots: each STATE channel has n_states + 1 ("other")
 * consecutive slots, in channel order. */
int32_t integ_state_slots(const integ_t *h);
void integ_totals(const integ_t *h, double *out);     /* n_channels values */
void integ_rejected(const integ_t *h, int64_t *out);  /* n_channels values */
void integ_counters(const integ_t *h, integ_counters_t *out);
int64_t integ_pending_windows(const integ_t *h);
double integ_lateness(const integ_t *h);

/* Dranchuk-Abou-Kassem compressibility factor; NaN outside 0 <= p_pr <= 30,
 * 1 <= t_pr <= 3, or without convergence. */
double integ_dak_z(double p_pr, double t_pr);
/* m = P V / (Z R T) in kg with P in bar (absolute); NaN if not defined. */
double integ_tank_mass(double pressure_bar, double temperature_k, double volume_m3,
                       double r_specific, double p_pc, double t_pc);

#endif
