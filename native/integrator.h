/*
 * cngmrv fuel-mix integrator: windowed trapezoid integration of sampled
 * flows with explicit gaps.  Plain C99, no I/O, no clock: time comes only
 * from the samples, so results are reproducible.  Semantics are specified
 * in docs/integrator.md; native/reference.py is the executable oracle and
 * must stay bit-for-bit in step with this file.
 *
 * Thread safety: none.  One integ_t belongs to one caller at a time.
 * Caller buffers are read during the call only and never retained.
 */
#ifndef CNGMRV_INTEGRATOR_H
#define CNGMRV_INTEGRATOR_H

#include <stdint.h>

enum {
    INTEG_OK = 0,
    INTEG_EINVAL = -1, /* bad argument (construction, channel index, watermark) */
    INTEG_ENOMEM = -2  /* allocation failed; state is as before the failing sample/call */
};

typedef struct integ integ_t;

/* One channel's result for one emitted window. */
typedef struct {
    double integral;      /* sum of v*scale*dt over covered time */
    double covered_s;     /* seconds integrated */
    double longest_gap_s; /* longest uncovered span ending in the window (0 if none) */
    int64_t gaps;         /* uncovered spans ending in the window */
} integ_cw_t;

typedef struct {
    int64_t rejected;        /* samples out of time order, non-finite t, or t out of range */
    int64_t late_gaps;       /* uncovered spans whose end fell in an already-closed window */
    int64_t skipped_windows; /* empty windows not emitted because of max_windows */
    double late_s;           /* integrable seconds that fell in already-closed windows */
} integ_counters_t;

/* max_gap[i] >= 0 and finite, scale[i] finite, period > 0 and finite,
 * origin finite, max_windows >= 0.  Returns NULL and sets *err on failure. */
integ_t *integ_new(int32_t n_channels, const double *max_gap, const double *scale, double period,
                   double origin, int64_t max_windows, int *err);
void integ_free(integ_t *h);

/* Feeds n samples of one channel.  *done receives how many were consumed
 * (all of them unless INTEG_ENOMEM). */
int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done);
int integ_push_one(integ_t *h, int32_t channel, double t, double v, int valid);

/* Close windows and stage them for reading.  Returns the number of staged
 * windows (>= 0) or an INTEG_E* code.  The staged windows stay readable
 * through integ_out_* until the next pop/flush/release. */
int64_t integ_pop(integ_t *h, double watermark);
int64_t integ_flush(integ_t *h);
const int64_t *integ_out_index(const integ_t *h);
const integ_cw_t *integ_out_channels(const integ_t *h); /* [window * n_channels + channel] */
void integ_out_release(integ_t *h);

void integ_totals(const integ_t *h, double *out); /* n_channels values */
void integ_counters(const integ_t *h, integ_counters_t *out);
int64_t integ_pending_windows(const integ_t *h);
double integ_lateness(const integ_t *h);

#endif
