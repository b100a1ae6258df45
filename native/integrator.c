/*
 * Implementation of integrator.h.  Every floating-point expression here is
 * mirrored, operation for operation, in native/reference.py: the oracle tests
 * rely on both producing the same bits, so reorder nothing without changing
 * both (and build with -ffp-contract=off so no FMA changes the rounding).
 */
#include "integrator.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Window indices stay within +-2^53 so that (double)k is exact and the
 * Python oracle's int arithmetic agrees with int64 here. */
#define K_LIMIT 9007199254740992.0
/* floor((t - origin) / period) can be one off the boundary comparison after
 * rounding; a few steps always suffice unless the window grid is degenerate. */
#define ADJUST_MAX 4
/* Keep small scratch buffers instead of returning them to malloc each pop. */
#define KEEP_RECORDS 1024
#define KEEP_OUT 4096

typedef struct {
    double s, c;
} nsum_t;

/* Neumaier (Kahan-Babuska) summation. */
static void nadd(nsum_t *a, double x) {
    double t = a->s + x;
    if (fabs(a->s) >= fabs(x)) {
        a->c += (a->s - t) + x;
    } else {
        a->c += (x - t) + a->s;
    }
    a->s = t;
}

static double nval(const nsum_t *a) { return a->s + a->c; }

typedef struct {
    nsum_t integral;
    nsum_t covered;
    double longest;
    int64_t gaps;
} acc_t;

typedef struct {
    double max_gap;
    double scale;
    double prev_t;
    double prev_v;
    int64_t prev_k;
    int has_prev;
    int prev_valid;
    nsum_t total;
} chan_t;

struct integ {
    int32_t nch;
    double period;
    double origin;
    double lateness;
    int64_t max_windows;
    chan_t *ch;
    /* Open windows that hold something, sorted by index: rk[i] is the index,
     * racc[i * nch + c] the accumulators.  Sparse so that a time jump costs
     * no memory for the empty windows it implies. */
    int64_t *rk;
    acc_t *racc;
    int64_t rn;
    int64_t rcap;
    /* Windows below frontier are closed (emitted or skipped). */
    int has_frontier;
    int64_t frontier;
    int64_t *ok;
    integ_cw_t *ocw;
    int64_t on;
    int64_t ocap;
    int64_t rejected;
    int64_t late_gaps;
    int64_t skipped;
    nsum_t late_s;
};

static double bnd(const integ_t *h, int64_t k) { return h->origin + (double)k * h->period; }

static int closed(const integ_t *h, int64_t k) { return h->has_frontier && k < h->frontier; }

/* Window index of t such that bnd(k) <= t < bnd(k + 1); 0 if out of range. */
static int kidx(const integ_t *h, double t, int64_t *out) {
    double q = (t - h->origin) / h->period;
    int64_t k;
    int i;
    if (!(fabs(q) < K_LIMIT)) {
        return 0;
    }
    k = (int64_t)floor(q);
    for (i = 0; i < ADJUST_MAX && bnd(h, k + 1) <= t; i++) {
        k++;
    }
    for (i = 0; i < ADJUST_MAX && bnd(h, k) > t; i++) {
        k--;
    }
    *out = k;
    return 1;
}

static int64_t sat_add(int64_t a, int64_t b) { return a > INT64_MAX - b ? INT64_MAX : a + b; }

static int reserve_records(integ_t *h, int64_t extra) {
    int64_t want, cap;
    int64_t *nk;
    acc_t *na;
    size_t per = (size_t)h->nch * sizeof(acc_t);
    if (extra < 0 || extra > (int64_t)(SIZE_MAX / per / 2) - h->rn) {
        return INTEG_ENOMEM;
    }
    want = h->rn + extra;
    if (want <= h->rcap) {
        return INTEG_OK;
    }
    cap = h->rcap < 16 ? 16 : h->rcap * 2;
    if (cap < want) {
        cap = want;
    }
    nk = (int64_t *)realloc(h->rk, (size_t)cap * sizeof(int64_t));
    if (nk == NULL) {
        return INTEG_ENOMEM;
    }
    h->rk = nk;
    na = (acc_t *)realloc(h->racc, (size_t)cap * per);
    if (na == NULL) {
        return INTEG_ENOMEM;
    }
    h->racc = na;
    h->rcap = cap;
    return INTEG_OK;
}

/* Slot of window k, inserting an empty one if absent.  Capacity must have
 * been reserved.  Samples mostly land in the newest window, so check it first. */
static int64_t slot(integ_t *h, int64_t k) {
    int64_t lo, hi, mid, n = h->rn;
    if (n == 0 || k > h->rk[n - 1]) {
        lo = n;
    } else if (k == h->rk[n - 1]) {
        return n - 1;
    } else {
        lo = 0;
        hi = n - 1;
        while (lo < hi) {
            mid = lo + (hi - lo) / 2;
            if (h->rk[mid] < k) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        if (h->rk[lo] == k) {
            return lo;
        }
        memmove(h->rk + lo + 1, h->rk + lo, (size_t)(n - lo) * sizeof(int64_t));
        memmove(h->racc + (lo + 1) * h->nch, h->racc + lo * h->nch,
                (size_t)(n - lo) * (size_t)h->nch * sizeof(acc_t));
    }
    h->rk[lo] = k;
    memset(h->racc + lo * h->nch, 0, (size_t)h->nch * sizeof(acc_t));
    h->rn = n + 1;
    return lo;
}

static void add_piece(integ_t *h, int32_t ci, int64_t j, double ta, double va, double tb,
                      double vb) {
    double dt = tb - ta;
    double val;
    acc_t *a;
    if (closed(h, j)) {
        nadd(&h->late_s, dt);
        return;
    }
    val = 0.5 * (va + vb) * dt * h->ch[ci].scale;
    a = &h->racc[slot(h, j) * h->nch + ci];
    nadd(&a->integral, val);
    nadd(&a->covered, dt);
    nadd(&h->ch[ci].total, val);
}

/* Splits [t0, t1] at window boundaries; interior values by linear
 * interpolation so the pieces add up to the span's trapezoid. */
static void integrate(integ_t *h, int32_t ci, double t0, double v0, int64_t k0, double t1,
                      double v1, int64_t k1) {
    double ta = t0, va = v0, b, vb;
    int64_t j;
    for (j = k0 + 1; j <= k1; j++) {
        b = bnd(h, j);
        /* Only a degenerate grid puts a boundary outside the span. */
        if (b < ta) {
            b = ta;
        }
        if (b > t1) {
            b = t1;
        }
        vb = v0 + (v1 - v0) * ((b - t0) / (t1 - t0));
        add_piece(h, ci, j - 1, ta, va, b, vb);
        ta = b;
        va = vb;
    }
    add_piece(h, ci, k1, ta, va, t1, v1);
}

static int process(integ_t *h, int32_t ci, double t, double v, int valid) {
    chan_t *c = &h->ch[ci];
    int64_t k1;
    int span, covered, rc;
    double dt;
    acc_t *a;
    if (!isfinite(t) || !kidx(h, t, &k1) || (c->has_prev && t < c->prev_t)) {
        h->rejected = sat_add(h->rejected, 1);
        return INTEG_OK;
    }
    valid = valid && isfinite(v);
    span = c->has_prev && t > c->prev_t;
    dt = span ? t - c->prev_t : 0.0;
    covered = span && c->prev_valid && valid && dt <= c->max_gap;
    /* Reserve before touching any state so ENOMEM leaves this sample unapplied. */
    rc = reserve_records(h, covered && k1 > c->prev_k ? k1 - c->prev_k + 1 : 1);
    if (rc != INTEG_OK) {
        return rc;
    }
    if (covered) {
        integrate(h, ci, c->prev_t, c->prev_v, c->prev_k, t, v, k1);
    } else if (!closed(h, k1)) {
        /* A sample marks its window as touched even when it adds nothing. */
        a = &h->racc[slot(h, k1) * h->nch + ci];
        if (span) {
            a->gaps++;
            if (dt > a->longest) {
                a->longest = dt;
            }
        }
    } else if (span) {
        h->late_gaps = sat_add(h->late_gaps, 1);
    }
    c->has_prev = 1;
    c->prev_t = t;
    c->prev_v = v;
    c->prev_valid = valid;
    c->prev_k = k1;
    return INTEG_OK;
}

integ_t *integ_new(int32_t n_channels, const double *max_gap, const double *scale, double period,
                   double origin, int64_t max_windows, int *err) {
    integ_t *h;
    int32_t i;
    *err = INTEG_EINVAL;
    if (n_channels <= 0 || !(period > 0.0) || !isfinite(period) || !isfinite(origin) ||
        max_windows < 0) {
        return NULL;
    }
    for (i = 0; i < n_channels; i++) {
        if (!(max_gap[i] >= 0.0) || !isfinite(max_gap[i]) || !isfinite(scale[i])) {
            return NULL;
        }
    }
    *err = INTEG_ENOMEM;
    h = (integ_t *)calloc(1, sizeof(integ_t));
    if (h == NULL) {
        return NULL;
    }
    h->ch = (chan_t *)calloc((size_t)n_channels, sizeof(chan_t));
    if (h->ch == NULL) {
        free(h);
        return NULL;
    }
    h->nch = n_channels;
    h->period = period;
    h->origin = origin;
    h->max_windows = max_windows;
    h->lateness = 0.0;
    for (i = 0; i < n_channels; i++) {
        h->ch[i].max_gap = max_gap[i];
        h->ch[i].scale = scale[i];
        if (max_gap[i] > h->lateness) {
            h->lateness = max_gap[i];
        }
    }
    *err = INTEG_OK;
    return h;
}

void integ_free(integ_t *h) {
    if (h == NULL) {
        return;
    }
    free(h->ch);
    free(h->rk);
    free(h->racc);
    free(h->ok);
    free(h->ocw);
    free(h);
}

int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done) {
    int64_t i;
    int rc;
    *done = 0;
    if (channel < 0 || channel >= h->nch || n < 0) {
        return INTEG_EINVAL;
    }
    for (i = 0; i < n; i++) {
        rc = process(h, channel, t[i], v[i], valid[i] != 0);
        if (rc != INTEG_OK) {
            *done = i;
            return rc;
        }
    }
    *done = n;
    return INTEG_OK;
}

int integ_push_one(integ_t *h, int32_t channel, double t, double v, int valid) {
    if (channel < 0 || channel >= h->nch) {
        return INTEG_EINVAL;
    }
    return process(h, channel, t, v, valid != 0);
}

void integ_out_release(integ_t *h) {
    h->on = 0;
    if (h->ocap > KEEP_OUT) {
        free(h->ok);
        free(h->ocw);
        h->ok = NULL;
        h->ocw = NULL;
        h->ocap = 0;
    }
}

/* Emits windows [start, limit]; see docs/integrator.md for the max_windows rule. */
static int64_t emit(integ_t *h, int64_t limit) {
    int64_t start, m, i, kk, run, pos, budget, nout, skipped, w, j;
    int32_t c;
    size_t per = (size_t)h->nch * sizeof(integ_cw_t);
    h->on = 0;
    if (h->has_frontier) {
        start = h->frontier;
    } else if (h->rn > 0) {
        start = h->rk[0];
    } else {
        return 0;
    }
    if (limit < start) {
        return 0;
    }
    m = 0;
    while (m < h->rn && h->rk[m] <= limit) {
        m++;
    }
    /* First pass sizes the output, so ENOMEM is reported before any state changes. */
    budget = h->max_windows;
    pos = start;
    nout = 0;
    skipped = 0;
    for (i = 0; i <= m; i++) {
        kk = i < m ? h->rk[i] : limit + 1;
        run = kk - pos;
        if (run > 0) {
            if (run <= budget) {
                budget -= run;
                nout += run;
            } else {
                skipped = sat_add(skipped, run);
            }
        }
        nout += i < m ? 1 : 0;
        pos = kk + 1;
    }
    if (nout > (int64_t)(SIZE_MAX / per / 2)) {
        return INTEG_ENOMEM;
    }
    if (nout > h->ocap) {
        int64_t *nk = (int64_t *)realloc(h->ok, (size_t)nout * sizeof(int64_t));
        integ_cw_t *nc;
        if (nk == NULL) {
            return INTEG_ENOMEM;
        }
        h->ok = nk;
        nc = (integ_cw_t *)realloc(h->ocw, (size_t)nout * per);
        if (nc == NULL) {
            return INTEG_ENOMEM;
        }
        h->ocw = nc;
        h->ocap = nout;
    }
    budget = h->max_windows;
    pos = start;
    w = 0;
    for (i = 0; i <= m; i++) {
        kk = i < m ? h->rk[i] : limit + 1;
        run = kk - pos;
        if (run > 0 && run <= budget) {
            budget -= run;
            for (j = pos; j < kk; j++, w++) {
                h->ok[w] = j;
                memset(h->ocw + w * h->nch, 0, per);
            }
        }
        if (i < m) {
            const acc_t *a = h->racc + i * h->nch;
            integ_cw_t *o = h->ocw + w * h->nch;
            h->ok[w] = kk;
            for (c = 0; c < h->nch; c++) {
                o[c].integral = nval(&a[c].integral);
                o[c].covered_s = nval(&a[c].covered);
                o[c].longest_gap_s = a[c].longest;
                o[c].gaps = a[c].gaps;
            }
            w++;
        }
        pos = kk + 1;
    }
    h->rn -= m;
    memmove(h->rk, h->rk + m, (size_t)h->rn * sizeof(int64_t));
    memmove(h->racc, h->racc + m * h->nch, (size_t)h->rn * (size_t)h->nch * sizeof(acc_t));
    if (h->rcap > KEEP_RECORDS && h->rn < h->rcap / 4) {
        /* Give back memory after a burst; failure to shrink is harmless. */
        int64_t cap = h->rcap / 2;
        int64_t *nk = (int64_t *)realloc(h->rk, (size_t)cap * sizeof(int64_t));
        if (nk != NULL) {
            acc_t *na;
            h->rk = nk;
            na = (acc_t *)realloc(h->racc, (size_t)cap * (size_t)h->nch * sizeof(acc_t));
            if (na != NULL) {
                h->racc = na;
                h->rcap = cap;
            }
        }
    }
    h->has_frontier = 1;
    h->frontier = limit + 1;
    h->skipped = sat_add(h->skipped, skipped);
    h->on = nout;
    return nout;
}

int64_t integ_pop(integ_t *h, double watermark) {
    double q;
    int64_t m;
    int i;
    if (!isfinite(watermark)) {
        return INTEG_EINVAL;
    }
    /* Largest m with bnd(m) + lateness <= watermark: window m - 1 is the last
     * one no in-order sample can still reach. */
    q = (watermark - h->lateness - h->origin) / h->period;
    if (!(fabs(q) < K_LIMIT)) {
        return INTEG_EINVAL;
    }
    m = (int64_t)floor(q);
    for (i = 0; i < ADJUST_MAX && bnd(h, m + 1) + h->lateness <= watermark; i++) {
        m++;
    }
    for (i = 0; i < ADJUST_MAX && bnd(h, m) + h->lateness > watermark; i++) {
        m--;
    }
    return emit(h, m - 1);
}

int64_t integ_flush(integ_t *h) {
    h->on = 0;
    if (h->rn == 0) {
        return 0;
    }
    return emit(h, h->rk[h->rn - 1]);
}

const int64_t *integ_out_index(const integ_t *h) { return h->ok; }

const integ_cw_t *integ_out_channels(const integ_t *h) { return h->ocw; }

void integ_totals(const integ_t *h, double *out) {
    int32_t i;
    for (i = 0; i < h->nch; i++) {
        out[i] = nval(&h->ch[i].total);
    }
}

void integ_counters(const integ_t *h, integ_counters_t *out) {
    out->rejected = h->rejected;
    out->late_gaps = h->late_gaps;
    out->skipped_windows = h->skipped;
    out->late_s = nval(&h->late_s);
}

int64_t integ_pending_windows(const integ_t *h) { return h->rn; }

double integ_lateness(const integ_t *h) { return h->lateness; }
