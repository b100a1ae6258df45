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
/* Newton iterations for the DAK reduced density, and the relative step that
 * ends them (quadratic convergence makes the last step far smaller). */
#define DAK_MAX_ITER 50
#define DAK_TOL 1e-13
/* Below this reduced pressure Z is 1 to better than 1e-9: return the ideal
 * gas rather than divide by a reduced density that underflows when squared. */
#define DAK_IDEAL_PR 1e-9
#define DAK_MIN_Y 1e-30
#define PA_PER_BAR 1e5

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
    double last;
    int64_t gaps;
    int64_t count;
} acc_t;

typedef struct {
    integ_spec_t spec;
    int32_t state_off; /* first state slot of a STATE channel */
    /* previous accepted sample */
    int has_prev;
    int prev_valid;
    double prev_t;
    double prev_v; /* RATE: value; STATE: slot index (0..n_states) */
    int64_t prev_k;
    double lo, hi; /* boundaries of window prev_k, for the same-window fast path */
    /* open gap (run of uncovered spans) */
    int run_open;
    double run_start;
    /* TANK refuel detection */
    int tank_seen;
    int filling;
    double low, high;
    nsum_t total; /* integrals of this channel's emitted windows */
    int64_t rejected;
    int64_t hint; /* record index this channel used last (may be stale) */
} chan_t;

struct integ {
    int32_t nch;
    int32_t nslots;
    int32_t nfuel;
    double period;
    double origin;
    double lateness;
    int64_t max_windows;
    chan_t *ch;
    integ_fuel_t *fuel;
    /* Open windows that hold something, sorted by index: rk[i] is the index,
     * racc[i * nch + c] the accumulators, rst[i * nslots + s] the state
     * seconds.  Sparse so that a time jump costs no memory for the empty
     * windows it implies. */
    int64_t *rk;
    acc_t *racc;
    nsum_t *rst;
    int64_t rn;
    int64_t rcap;
    /* Windows below frontier are closed (emitted or skipped). */
    int has_frontier;
    int64_t frontier;
    /* staged output */
    int64_t *ok;
    integ_cw_t *ocw;
    double *ost;
    integ_fw_t *ofu;
    int64_t on;
    int64_t ocap;
    int64_t rejected;
    int64_t late_gaps;
    int64_t late_points;
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

static size_t acc_bytes(const integ_t *h) { return (size_t)h->nch * sizeof(acc_t); }

static size_t st_bytes(const integ_t *h) { return (size_t)h->nslots * sizeof(nsum_t); }

static int reserve_records(integ_t *h, int64_t extra) {
    int64_t want, cap;
    int64_t *nk;
    acc_t *na;
    nsum_t *ns;
    size_t per;
    /* The common case first: this runs once per sample. */
    if (extra >= 0 && extra <= h->rcap - h->rn) {
        return INTEG_OK;
    }
    per = acc_bytes(h) + st_bytes(h) + sizeof(int64_t);
    if (extra < 0 || extra > (int64_t)(SIZE_MAX / per / 2) - h->rn) {
        return INTEG_ENOMEM;
    }
    want = h->rn + extra;
    cap = h->rcap < 16 ? 16 : h->rcap * 2;
    if (cap < want) {
        cap = want;
    }
    nk = (int64_t *)realloc(h->rk, (size_t)cap * sizeof(int64_t));
    if (nk == NULL) {
        return INTEG_ENOMEM;
    }
    h->rk = nk;
    na = (acc_t *)realloc(h->racc, (size_t)cap * acc_bytes(h));
    if (na == NULL) {
        return INTEG_ENOMEM;
    }
    h->racc = na;
    if (h->nslots > 0) {
        ns = (nsum_t *)realloc(h->rst, (size_t)cap * st_bytes(h));
        if (ns == NULL) {
            return INTEG_ENOMEM;
        }
        h->rst = ns;
    }
    h->rcap = cap;
    return INTEG_OK;
}

/* Slot of window k, inserting an empty one if absent.  Capacity must have
 * been reserved.  Samples mostly land in the newest window, so check it first. */
static int64_t slot(integ_t *h, int64_t k) {
    int64_t lo, hi, mid, n = h->rn;
    int32_t c;
    if (n > 0 && k == h->rk[n - 1]) {
        return n - 1;
    }
    if (n == 0 || k > h->rk[n - 1]) {
        lo = n;
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
                (size_t)(n - lo) * acc_bytes(h));
        if (h->nslots > 0) {
            memmove(h->rst + (lo + 1) * h->nslots, h->rst + lo * h->nslots,
                    (size_t)(n - lo) * st_bytes(h));
        }
    }
    h->rk[lo] = k;
    memset(h->racc + lo * h->nch, 0, acc_bytes(h));
    for (c = 0; c < h->nch; c++) {
        h->racc[lo * h->nch + c].last = NAN;
    }
    if (h->nslots > 0) {
        memset(h->rst + lo * h->nslots, 0, st_bytes(h));
    }
    h->rn = n + 1;
    return lo;
}

/* slot() with a per-channel hint: a channel's samples walk the windows in
 * order, so its window is usually the one it used last or the next one, even
 * when other channels made that window the newest long ago. */
static int64_t slot_hint(integ_t *h, int64_t k, int64_t *hint) {
    int64_t i = *hint;
    if (i >= 0 && i < h->rn) {
        if (h->rk[i] == k) {
            return i;
        }
        if (i + 1 < h->rn && h->rk[i + 1] == k) {
            *hint = i + 1;
            return i + 1;
        }
    }
    i = slot(h, k);
    *hint = i;
    return i;
}

static acc_t *acc_at(integ_t *h, int64_t k, int32_t ci) {
    return &h->racc[slot_hint(h, k, &h->ch[ci].hint) * h->nch + ci];
}

static void record_gap(integ_t *h, int32_t ci, int64_t k, double len) {
    acc_t *a;
    if (closed(h, k)) {
        h->late_gaps = sat_add(h->late_gaps, 1);
        return;
    }
    a = acc_at(h, k, ci);
    a->gaps++;
    if (len > a->longest) {
        a->longest = len;
    }
}

/* ---- covered spans, split at window boundaries ------------------------ */

static void rate_piece(integ_t *h, int32_t ci, int64_t j, double ta, double va, double tb,
                       double vb) {
    double dt = tb - ta;
    double val;
    acc_t *a;
    chan_t *c = &h->ch[ci];
    if (closed(h, j)) {
        nadd(&h->late_s, dt);
        return;
    }
    val = 0.5 * (va + vb) * dt * c->spec.scale;
    a = acc_at(h, j, ci);
    nadd(&a->integral, val);
    nadd(&a->covered, dt);
}

/* Interior values by linear interpolation so the pieces add up to the span's trapezoid. */
static void integrate_rate(integ_t *h, int32_t ci, double t0, double v0, int64_t k0, double t1,
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
        rate_piece(h, ci, j - 1, ta, va, b, vb);
        ta = b;
        va = vb;
    }
    rate_piece(h, ci, k1, ta, va, t1, v1);
}

/* A piece of a STATE span: qa, qb are the fractions of the span at its ends. */
static void state_piece(integ_t *h, int32_t ci, int64_t j, double ta, double qa, double tb,
                        double qb, int32_t s0, int32_t s1) {
    double dt = tb - ta;
    int64_t i;
    acc_t *a;
    nsum_t *st;
    chan_t *c = &h->ch[ci];
    if (closed(h, j)) {
        nadd(&h->late_s, dt);
        return;
    }
    i = slot_hint(h, j, &c->hint);
    a = &h->racc[i * h->nch + ci];
    st = h->rst + i * h->nslots + c->state_off;
    nadd(&a->covered, dt);
    if (s0 == s1) {
        nadd(&st[s0], dt);
    } else {
        nadd(&st[s0], 0.5 * ((1.0 - qa) + (1.0 - qb)) * dt);
        nadd(&st[s1], 0.5 * (qa + qb) * dt);
    }
}

static void integrate_state(integ_t *h, int32_t ci, double t0, int32_t s0, int64_t k0, double t1,
                            int32_t s1, int64_t k1) {
    double ta = t0, qa = 0.0, b, qb;
    int64_t j;
    for (j = k0 + 1; j <= k1; j++) {
        b = bnd(h, j);
        if (b < ta) {
            b = ta;
        }
        if (b > t1) {
            b = t1;
        }
        qb = (b - t0) / (t1 - t0);
        state_piece(h, ci, j - 1, ta, qa, b, qb, s0, s1);
        ta = b;
        qa = qb;
    }
    state_piece(h, ci, k1, ta, qa, t1, 1.0, s0, s1);
}

static void cover_piece(integ_t *h, int32_t ci, int64_t j, double ta, double tb) {
    double dt = tb - ta;
    if (closed(h, j)) {
        nadd(&h->late_s, dt);
        return;
    }
    nadd(&acc_at(h, j, ci)->covered, dt);
}

/* EVENTS and TANK spans carry coverage only. */
static void integrate_cover(integ_t *h, int32_t ci, double t0, int64_t k0, double t1, int64_t k1) {
    double ta = t0, b;
    int64_t j;
    for (j = k0 + 1; j <= k1; j++) {
        b = bnd(h, j);
        if (b < ta) {
            b = ta;
        }
        if (b > t1) {
            b = t1;
        }
        cover_piece(h, ci, j - 1, ta, b);
        ta = b;
    }
    cover_piece(h, ci, k1, ta, t1);
}

/* ---- one sample ------------------------------------------------------- */

/* Accepts t (sets *k) or rejects it (counts it, returns 0). */
static int accept(integ_t *h, chan_t *c, double t, int64_t *k) {
    if (!isfinite(t) || (c->has_prev && !(t > c->prev_t))) {
        goto reject;
    }
    if (c->has_prev && t >= c->lo && t < c->hi) {
        *k = c->prev_k;
        return 1;
    }
    if (kidx(h, t, k)) {
        return 1;
    }
reject:
    h->rejected = sat_add(h->rejected, 1);
    c->rejected = sat_add(c->rejected, 1);
    return 0;
}

static int32_t state_of(const chan_t *c, double v) {
    if (v >= 0.0 && v < (double)c->spec.n_states && v == floor(v)) {
        return (int32_t)v;
    }
    return c->spec.n_states;
}

/* The part common to every kind: span, coverage, gap runs, state update.
 * Returns INTEG_ENOMEM before changing anything if memory runs out. */
static int step(integ_t *h, int32_t ci, double t, int64_t k1, double v, int valid) {
    chan_t *c = &h->ch[ci];
    int span = c->has_prev;
    double dt = span ? t - c->prev_t : 0.0;
    int covered = span && c->prev_valid && valid && dt <= c->spec.max_gap;
    int rc = reserve_records(h, covered && k1 > c->prev_k ? k1 - c->prev_k + 1 : 1);
    if (rc != INTEG_OK) {
        return rc;
    }
    if (covered) {
        if (c->run_open) {
            record_gap(h, ci, c->prev_k, c->prev_t - c->run_start);
            c->run_open = 0;
        }
        switch (c->spec.kind) {
        case INTEG_RATE:
            integrate_rate(h, ci, c->prev_t, c->prev_v, c->prev_k, t, v, k1);
            break;
        case INTEG_STATE:
            integrate_state(h, ci, c->prev_t, (int32_t)c->prev_v, c->prev_k, t, (int32_t)v, k1);
            break;
        default:
            integrate_cover(h, ci, c->prev_t, c->prev_k, t, k1);
            break;
        }
    } else {
        if (span && !c->run_open) {
            c->run_open = 1;
            c->run_start = c->prev_t;
        }
        /* A sample marks its window as touched even when it adds nothing. */
        if (!closed(h, k1)) {
            slot_hint(h, k1, &c->hint);
        }
    }
    c->has_prev = 1;
    c->prev_t = t;
    c->prev_v = v;
    c->prev_valid = valid;
    if (c->prev_k != k1 || span == 0) {
        c->prev_k = k1;
        c->lo = bnd(h, k1);
        c->hi = bnd(h, k1 + 1);
    }
    return INTEG_OK;
}

static int process(integ_t *h, int32_t ci, double t, double v, int valid) {
    chan_t *c = &h->ch[ci];
    int64_t k1;
    if (!accept(h, c, t, &k1)) {
        return INTEG_OK;
    }
    valid = valid && isfinite(v);
    if (c->spec.kind == INTEG_STATE) {
        v = valid ? (double)state_of(c, v) : 0.0;
    }
    return step(h, ci, t, k1, v, valid);
}

static double event_mass(const chan_t *c, double pulse, double p, double temp) {
    double d = pulse - c->spec.dead_time;
    if (d < 0.0) {
        d = 0.0;
    }
    return c->spec.k * d * p / sqrt(temp);
}

static int process_event(integ_t *h, int32_t ci, double t, double pulse, double p, double temp,
                         int valid) {
    chan_t *c = &h->ch[ci];
    int64_t k1;
    double m = 0.0;
    acc_t *a;
    int rc;
    if (!accept(h, c, t, &k1)) {
        return INTEG_OK;
    }
    valid = valid && isfinite(pulse) && isfinite(p) && isfinite(temp) && pulse >= 0.0 &&
            p >= 0.0 && temp > 0.0;
    if (valid) {
        m = event_mass(c, pulse, p, temp);
    }
    rc = step(h, ci, t, k1, 0.0, valid);
    if (rc != INTEG_OK || !valid) {
        return rc;
    }
    if (closed(h, k1)) {
        h->late_points = sat_add(h->late_points, 1);
        return INTEG_OK;
    }
    a = acc_at(h, k1, ci); /* touched by step(), so no allocation */
    nadd(&a->integral, m);
    a->count++;
    return INTEG_OK;
}

static int process_tank(integ_t *h, int32_t ci, double t, double p, double temp, int valid) {
    chan_t *c = &h->ch[ci];
    int64_t k1;
    double m = NAN, added = 0.0;
    int started = 0, rc;
    acc_t *a;
    if (!accept(h, c, t, &k1)) {
        return INTEG_OK;
    }
    if (valid) {
        m = integ_tank_mass(p, temp, c->spec.volume_m3, c->spec.r_specific, c->spec.p_pc,
                            c->spec.t_pc);
        valid = !isnan(m);
    }
    rc = step(h, ci, t, k1, 0.0, valid);
    if (rc != INTEG_OK || !valid) {
        return rc;
    }
    if (!c->tank_seen) {
        c->tank_seen = 1;
        c->low = m;
        c->high = m;
    } else if (!c->filling) {
        if (m < c->low) {
            c->low = m;
        }
        if (m - c->low >= c->spec.refuel_kg) {
            started = 1;
            added = m - c->low;
            c->filling = 1;
            c->high = m;
        }
    } else if (m > c->high) {
        added = m - c->high;
        c->high = m;
    } else if (m <= c->high - c->spec.refuel_kg) {
        c->filling = 0;
        c->low = m;
    }
    if (closed(h, k1)) {
        h->late_points = sat_add(h->late_points, 1);
        return INTEG_OK;
    }
    a = acc_at(h, k1, ci);
    a->last = m;
    if (started) {
        a->count++;
    }
    if (added > 0.0) {
        nadd(&a->integral, added);
    }
    return INTEG_OK;
}

/* ---- construction ----------------------------------------------------- */

static int spec_ok(const integ_spec_t *s) {
    if (!(s->max_gap >= 0.0) || !isfinite(s->max_gap)) {
        return 0;
    }
    switch (s->kind) {
    case INTEG_RATE:
        return isfinite(s->scale);
    case INTEG_STATE:
        return s->n_states >= 1 && s->n_states < INT32_MAX;
    case INTEG_EVENTS:
        return isfinite(s->k) && s->k >= 0.0 && isfinite(s->dead_time) && s->dead_time >= 0.0;
    case INTEG_TANK:
        return isfinite(s->volume_m3) && s->volume_m3 > 0.0 && isfinite(s->r_specific) &&
               s->r_specific > 0.0 && isfinite(s->p_pc) && s->p_pc > 0.0 && isfinite(s->t_pc) &&
               s->t_pc > 0.0 && isfinite(s->refuel_kg) && s->refuel_kg > 0.0;
    default:
        return 0;
    }
}

integ_t *integ_new(int32_t n_channels, const integ_spec_t *specs, int32_t n_fuels,
                   const integ_fuel_t *fuels, double period, double origin, int64_t max_windows,
                   int *err) {
    integ_t *h;
    int32_t i;
    int64_t slots = 0;
    *err = INTEG_EINVAL;
    if (n_channels <= 0 || n_fuels < 0 || !(period > 0.0) || !isfinite(period) ||
        !isfinite(origin) || max_windows < 0) {
        return NULL;
    }
    for (i = 0; i < n_channels; i++) {
        if (!spec_ok(&specs[i])) {
            return NULL;
        }
        if (specs[i].kind == INTEG_STATE) {
            slots += (int64_t)specs[i].n_states + 1;
            if (slots > INT32_MAX / 2) {
                return NULL;
            }
        }
    }
    for (i = 0; i < n_fuels; i++) {
        int32_t fc = fuels[i].channel;
        if (fc < 0 || fc >= n_channels ||
            (specs[fc].kind != INTEG_RATE && specs[fc].kind != INTEG_EVENTS) ||
            !isfinite(fuels[i].mj_per_unit) || !(fuels[i].mj_per_unit >= 0.0) ||
            !isfinite(fuels[i].kg_co2_per_mj) || !(fuels[i].kg_co2_per_mj >= 0.0)) {
            return NULL;
        }
    }
    *err = INTEG_ENOMEM;
    h = (integ_t *)calloc(1, sizeof(integ_t));
    if (h == NULL) {
        return NULL;
    }
    h->ch = (chan_t *)calloc((size_t)n_channels, sizeof(chan_t));
    h->fuel = (integ_fuel_t *)calloc((size_t)(n_fuels > 0 ? n_fuels : 1), sizeof(integ_fuel_t));
    if (h->ch == NULL || h->fuel == NULL) {
        free(h->ch);
        free(h->fuel);
        free(h);
        return NULL;
    }
    h->nch = n_channels;
    h->nfuel = n_fuels;
    h->nslots = (int32_t)slots;
    h->period = period;
    h->origin = origin;
    h->max_windows = max_windows;
    h->lateness = 0.0;
    slots = 0;
    for (i = 0; i < n_channels; i++) {
        h->ch[i].spec = specs[i];
        if (specs[i].kind == INTEG_STATE) {
            h->ch[i].state_off = (int32_t)slots;
            slots += (int64_t)specs[i].n_states + 1;
        }
        if (specs[i].max_gap > h->lateness) {
            h->lateness = specs[i].max_gap;
        }
    }
    if (n_fuels > 0) {
        memcpy(h->fuel, fuels, (size_t)n_fuels * sizeof(integ_fuel_t));
    }
    *err = INTEG_OK;
    return h;
}

void integ_free(integ_t *h) {
    if (h == NULL) {
        return;
    }
    free(h->ch);
    free(h->fuel);
    free(h->rk);
    free(h->racc);
    free(h->rst);
    free(h->ok);
    free(h->ocw);
    free(h->ost);
    free(h->ofu);
    free(h);
}

/* ---- input -------------------------------------------------------------- */

static int kind_ok(const integ_t *h, int32_t channel, int kind_a, int kind_b) {
    return channel >= 0 && channel < h->nch &&
           (h->ch[channel].spec.kind == kind_a || h->ch[channel].spec.kind == kind_b);
}

/* The hot path of a RATE channel: consecutive valid samples in the window
 * of the previous one, within max_gap, with no gap to close.  It performs
 * exactly the operations process() would (rate_piece for one piece, in the
 * same order), on local copies of the accumulators, and hands any other
 * sample to process().  Returns how many samples it consumed. */
static int64_t rate_run(integ_t *h, int32_t ci, const double *t, const double *v,
                        const uint8_t *valid, int64_t n) {
    chan_t *c = &h->ch[ci];
    acc_t *a;
    nsum_t ai, ac;
    double pt, pv, hi, mg, sc, ti, vi, dt, val;
    int64_t i;
    if (!c->has_prev || !c->prev_valid || c->run_open || closed(h, c->prev_k) ||
        !(c->prev_t >= c->lo) || reserve_records(h, 1) != INTEG_OK) {
        return 0;
    }
    a = acc_at(h, c->prev_k, ci); /* touched by the previous sample: no insertion */
    ai = a->integral;
    ac = a->covered;
    pt = c->prev_t;
    pv = c->prev_v;
    hi = c->hi;
    mg = c->spec.max_gap;
    sc = c->spec.scale;
    for (i = 0; i < n; i++) {
        ti = t[i];
        vi = v[i];
        /* NaN fails every comparison, hi is finite, and pt >= lo (checked
         * above, then by induction), so this is accept()'s fast path. */
        if (!(ti > pt && ti < hi) || !valid[i] || !isfinite(vi)) {
            break;
        }
        dt = ti - pt;
        if (!(dt <= mg)) {
            break;
        }
        val = 0.5 * (pv + vi) * dt * sc;
        nadd(&ai, val);
        nadd(&ac, dt);
        pt = ti;
        pv = vi;
    }
    a->integral = ai;
    a->covered = ac;
    c->prev_t = pt;
    c->prev_v = pv;
    return i;
}

int integ_push(integ_t *h, int32_t channel, const double *t, const double *v,
               const uint8_t *valid, int64_t n, int64_t *done) {
    int64_t i;
    int rc;
    *done = 0;
    if (!kind_ok(h, channel, INTEG_RATE, INTEG_STATE) || n < 0) {
        return INTEG_EINVAL;
    }
    if (h->ch[channel].spec.kind == INTEG_RATE) {
        for (i = 0; i < n; i++) {
            i += rate_run(h, channel, t + i, v + i, valid + i, n - i);
            if (i == n) {
                break;
            }
            rc = process(h, channel, t[i], v[i], valid[i] != 0);
            if (rc != INTEG_OK) {
                *done = i;
                return rc;
            }
        }
        *done = n;
        return INTEG_OK;
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
    if (!kind_ok(h, channel, INTEG_RATE, INTEG_STATE)) {
        return INTEG_EINVAL;
    }
    return process(h, channel, t, v, valid != 0);
}

int integ_push_events(integ_t *h, int32_t channel, const double *t, const double *pulse,
                      const double *pressure, const double *temperature, const uint8_t *valid,
                      int64_t n, int64_t *done) {
    int64_t i;
    int rc;
    *done = 0;
    if (!kind_ok(h, channel, INTEG_EVENTS, INTEG_EVENTS) || n < 0) {
        return INTEG_EINVAL;
    }
    for (i = 0; i < n; i++) {
        rc = process_event(h, channel, t[i], pulse[i], pressure[i], temperature[i], valid[i] != 0);
        if (rc != INTEG_OK) {
            *done = i;
            return rc;
        }
    }
    *done = n;
    return INTEG_OK;
}

int integ_push_tank(integ_t *h, int32_t channel, const double *t, const double *pressure,
                    const double *temperature, const uint8_t *valid, int64_t n, int64_t *done) {
    int64_t i;
    int rc;
    *done = 0;
    if (!kind_ok(h, channel, INTEG_TANK, INTEG_TANK) || n < 0) {
        return INTEG_EINVAL;
    }
    for (i = 0; i < n; i++) {
        rc = process_tank(h, channel, t[i], pressure[i], temperature[i], valid[i] != 0);
        if (rc != INTEG_OK) {
            *done = i;
            return rc;
        }
    }
    *done = n;
    return INTEG_OK;
}

/* ---- output ------------------------------------------------------------- */

void integ_out_release(integ_t *h) {
    h->on = 0;
    if (h->ocap > KEEP_OUT) {
        free(h->ok);
        free(h->ocw);
        free(h->ost);
        free(h->ofu);
        h->ok = NULL;
        h->ocw = NULL;
        h->ost = NULL;
        h->ofu = NULL;
        h->ocap = 0;
    }
}

static int reserve_out(integ_t *h, int64_t nout) {
    size_t per = (size_t)h->nch * sizeof(integ_cw_t) + (size_t)h->nslots * sizeof(double) +
                 (size_t)h->nfuel * sizeof(integ_fw_t) + sizeof(int64_t);
    void *p;
    if (nout > (int64_t)(SIZE_MAX / per / 2)) {
        return INTEG_ENOMEM;
    }
    if (nout <= h->ocap) {
        return INTEG_OK;
    }
    p = realloc(h->ok, (size_t)nout * sizeof(int64_t));
    if (p == NULL) {
        return INTEG_ENOMEM;
    }
    h->ok = (int64_t *)p;
    p = realloc(h->ocw, (size_t)nout * (size_t)h->nch * sizeof(integ_cw_t));
    if (p == NULL) {
        return INTEG_ENOMEM;
    }
    h->ocw = (integ_cw_t *)p;
    /* +1: never ask realloc for 0 bytes, whose result may be NULL. */
    p = realloc(h->ost, ((size_t)nout * (size_t)h->nslots + 1) * sizeof(double));
    if (p == NULL) {
        return INTEG_ENOMEM;
    }
    h->ost = (double *)p;
    p = realloc(h->ofu, ((size_t)nout * (size_t)h->nfuel + 1) * sizeof(integ_fw_t));
    if (p == NULL) {
        return INTEG_ENOMEM;
    }
    h->ofu = (integ_fw_t *)p;
    h->ocap = nout;
    return INTEG_OK;
}

static void emit_empty(integ_t *h, int64_t w, int64_t k) {
    int32_t c;
    integ_cw_t *o = h->ocw + w * h->nch;
    h->ok[w] = k;
    memset(o, 0, (size_t)h->nch * sizeof(integ_cw_t));
    for (c = 0; c < h->nch; c++) {
        o[c].last = NAN;
    }
    for (c = 0; c < h->nslots; c++) {
        h->ost[w * h->nslots + c] = 0.0;
    }
}

static void emit_fuels(integ_t *h, int64_t w) {
    int32_t f;
    for (f = 0; f < h->nfuel; f++) {
        const integ_fuel_t *fu = &h->fuel[f];
        integ_fw_t *o = &h->ofu[w * h->nfuel + f];
        o->energy_mj = h->ocw[w * h->nch + fu->channel].integral * fu->mj_per_unit;
        o->co2_kg = o->energy_mj * fu->kg_co2_per_mj;
    }
}

/* Emits windows [start, limit]; see docs/integrator.md for the max_windows rule. */
static int64_t emit(integ_t *h, int64_t limit) {
    int64_t start, m, i, kk, run, pos, budget, nout, skipped, w, j;
    int32_t c;
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
    if (reserve_out(h, nout) != INTEG_OK) {
        return INTEG_ENOMEM;
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
                emit_empty(h, w, j);
                emit_fuels(h, w);
            }
        }
        if (i < m) {
            const acc_t *a = h->racc + i * h->nch;
            integ_cw_t *o = h->ocw + w * h->nch;
            h->ok[w] = kk;
            for (c = 0; c < h->nch; c++) {
                o[c].integral = nval(&a[c].integral);
                nadd(&h->ch[c].total, o[c].integral);
                o[c].covered_s = nval(&a[c].covered);
                o[c].longest_gap_s = a[c].longest;
                o[c].last = a[c].last;
                o[c].gaps = a[c].gaps;
                o[c].events = a[c].count;
            }
            for (c = 0; c < h->nslots; c++) {
                h->ost[w * h->nslots + c] = nval(&h->rst[i * h->nslots + c]);
            }
            emit_fuels(h, w);
            w++;
        }
        pos = kk + 1;
    }
    h->rn -= m;
    memmove(h->rk, h->rk + m, (size_t)h->rn * sizeof(int64_t));
    memmove(h->racc, h->racc + m * h->nch, (size_t)h->rn * acc_bytes(h));
    if (h->nslots > 0) {
        memmove(h->rst, h->rst + m * h->nslots, (size_t)h->rn * st_bytes(h));
    }
    if (h->rcap > KEEP_RECORDS && h->rn < h->rcap / 4) {
        /* Give back memory after a burst; failure to shrink is harmless, and
         * rcap only drops once every array has shrunk. */
        int64_t cap = h->rcap / 2;
        int64_t *nk = (int64_t *)realloc(h->rk, (size_t)cap * sizeof(int64_t));
        if (nk != NULL) {
            acc_t *na;
            h->rk = nk;
            na = (acc_t *)realloc(h->racc, (size_t)cap * acc_bytes(h));
            if (na != NULL) {
                h->racc = na;
                if (h->nslots == 0) {
                    h->rcap = cap;
                } else {
                    nsum_t *ns = (nsum_t *)realloc(h->rst, (size_t)cap * st_bytes(h));
                    if (ns != NULL) {
                        h->rst = ns;
                        h->rcap = cap;
                    }
                }
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
    int32_t ci;
    h->on = 0;
    /* Gaps still open end at their channel's last sample (docs section 3);
     * if that sample's window is already closed, the first open window
     * reports them, so an honest caller never loses one to late_gaps. */
    for (ci = 0; ci < h->nch; ci++) {
        chan_t *c = &h->ch[ci];
        if (c->run_open) {
            if (reserve_records(h, 1) != INTEG_OK) {
                return INTEG_ENOMEM;
            }
            record_gap(h, ci, closed(h, c->prev_k) ? h->frontier : c->prev_k,
                       c->prev_t - c->run_start);
            c->run_open = 0;
        }
    }
    if (h->rn == 0) {
        return 0;
    }
    return emit(h, h->rk[h->rn - 1]);
}

const int64_t *integ_out_index(const integ_t *h) { return h->ok; }

const integ_cw_t *integ_out_channels(const integ_t *h) { return h->ocw; }

const double *integ_out_states(const integ_t *h) { return h->ost; }

const integ_fw_t *integ_out_fuels(const integ_t *h) { return h->ofu; }

int32_t integ_state_slots(const integ_t *h) { return h->nslots; }

/* Emitted windows were added to total as they left; pending ones are added
 * here, in index order, to a copy. */
void integ_totals(const integ_t *h, double *out) {
    int32_t i;
    int64_t r;
    for (i = 0; i < h->nch; i++) {
        nsum_t sum = h->ch[i].total;
        for (r = 0; r < h->rn; r++) {
            nadd(&sum, nval(&h->racc[r * h->nch + i].integral));
        }
        out[i] = nval(&sum);
    }
}

void integ_rejected(const integ_t *h, int64_t *out) {
    int32_t i;
    for (i = 0; i < h->nch; i++) {
        out[i] = h->ch[i].rejected;
    }
}

void integ_counters(const integ_t *h, integ_counters_t *out) {
    out->rejected = h->rejected;
    out->late_gaps = h->late_gaps;
    out->late_points = h->late_points;
    out->skipped_windows = h->skipped;
    out->late_s = nval(&h->late_s);
}

int64_t integ_pending_windows(const integ_t *h) { return h->rn; }

double integ_lateness(const integ_t *h) { return h->lateness; }

/* ---- real gas ------------------------------------------------------------ */

/* Dranchuk & Abou-Kassem (1975) constants. */
#define DAK_A1 0.3265
#define DAK_A2 (-1.0700)
#define DAK_A3 (-0.5339)
#define DAK_A4 0.01569
#define DAK_A5 (-0.05165)
#define DAK_A6 0.5475
#define DAK_A7 (-0.7361)
#define DAK_A8 0.1844
#define DAK_A9 0.1056
#define DAK_A10 0.6134
#define DAK_A11 0.7210

double integ_dak_z(double p_pr, double t_pr) {
    double t, t2, t3, t4, t5, r1, r2, r3, r4, r5, y, y2, y4, e, f, df, dy;
    int i;
    if (!(p_pr >= 0.0 && p_pr <= 30.0 && t_pr >= 1.0 && t_pr <= 3.0)) {
        return NAN;
    }
    if (p_pr < DAK_IDEAL_PR) {
        return 1.0;
    }
    t = 1.0 / t_pr;
    t2 = t * t;
    t3 = t2 * t;
    t4 = t3 * t;
    t5 = t4 * t;
    r1 = DAK_A1 + DAK_A2 * t + DAK_A3 * t3 + DAK_A4 * t4 + DAK_A5 * t5;
    r2 = 0.27 * p_pr * t;
    r3 = DAK_A6 + DAK_A7 * t + DAK_A8 * t2;
    r4 = DAK_A9 * (DAK_A7 * t + DAK_A8 * t2);
    r5 = DAK_A10 * t3;
    y = r2;
    for (i = 0; i < DAK_MAX_ITER; i++) {
        y2 = y * y;
        y4 = y2 * y2;
        e = exp(-DAK_A11 * y2);
        f = r1 * y - r2 / y + r3 * y2 - r4 * (y4 * y) + r5 * y2 * (1.0 + DAK_A11 * y2) * e + 1.0;
        df = r1 + r2 / y2 + 2.0 * r3 * y - 5.0 * r4 * y4 +
             2.0 * r5 * y * (1.0 + DAK_A11 * y2 - DAK_A11 * DAK_A11 * y4) * e;
        if (!(df != 0.0) || !isfinite(df)) {
            return NAN;
        }
        dy = f / df;
        y = y - dy;
        if (!(y > DAK_MIN_Y) || !isfinite(y)) {
            return NAN;
        }
        if (fabs(dy) <= DAK_TOL * y) {
            return r2 / y;
        }
    }
    return NAN;
}

double integ_tank_mass(double pressure_bar, double temperature_k, double volume_m3,
                       double r_specific, double p_pc, double t_pc) {
    double z;
    if (!isfinite(pressure_bar) || !isfinite(temperature_k) || !(pressure_bar >= 0.0) ||
        !(temperature_k > 0.0)) {
        return NAN;
    }
    z = integ_dak_z(pressure_bar / p_pc, temperature_k / t_pc);
    if (isnan(z) || !(z > 0.0)) {
        return NAN;
    }
    return pressure_bar * PA_PER_BAR * volume_m3 / (z * r_specific * temperature_k);
}
