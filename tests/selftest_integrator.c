/*
 * Standalone driver for the integrator core, built with AddressSanitizer and
 * UndefinedBehaviorSanitizer by tests/sanitize_native.py (make sanitize).  Unlike
 * the Python tests it runs in a process of its own, so LeakSanitizer can
 * check that integ_free() returns everything.
 *
 * It replays pseudo-random streams on every channel kind (bad times,
 * duplicates, invalid and non-finite values, gaps, huge jumps), chunked and
 * interleaved with pops, and checks invariants that hold for any input:
 * every window is emitted once, in order; state seconds add up to coverage;
 * windows sum to the running totals.  Exit status 0 means all passed.
 *
 * Usage: selftest [iterations]
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "integrator.h"

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t next_u64(void) {
    /* xorshift64*: deterministic, so a failure is reproducible by iteration */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}

static double uniform(double lo, double hi) {
    return lo + (hi - lo) * ((double)(next_u64() >> 11) / 9007199254740992.0);
}

static int chance(int percent) { return (int)(next_u64() % 100) < percent; }

static double odd_value(double normal) {
    switch (next_u64() % 40) {
    case 0:
        return NAN;
    case 1:
        return INFINITY;
    case 2:
        return -INFINITY;
    default:
        return normal;
    }
}

#define NCH 5
#define CHUNK 64

static int failures = 0;

#define CHECK(cond, ...)                                                                      \
    do {                                                                                      \
        if (!(cond)) {                                                                        \
            fprintf(stderr, "selftest: " __VA_ARGS__);                                        \
            fputc('\n', stderr);                                                              \
            failures++;                                                                       \
        }                                                                                     \
    } while (0)

typedef struct {
    int64_t next_index; /* emitted windows must increase */
    int have;
    double sums[NCH];
} seen_t;

static void check_windows(integ_t *h, int64_t n, seen_t *seen) {
    const int64_t *idx = integ_out_index(h);
    const integ_cw_t *cw = integ_out_channels(h);
    const double *st = integ_out_states(h);
    const integ_fw_t *fw = integ_out_fuels(h);
    int32_t slots = integ_state_slots(h);
    int64_t w;
    int c;
    CHECK(n >= 0, "pop/flush failed: %lld", (long long)n);
    for (w = 0; w < n; w++) {
        double states = 0.0;
        int s;
        CHECK(!seen->have || idx[w] >= seen->next_index, "window %lld emitted out of order",
              (long long)idx[w]);
        seen->have = 1;
        seen->next_index = idx[w] + 1;
        for (c = 0; c < NCH; c++) {
            const integ_cw_t *o = &cw[w * NCH + c];
            CHECK(o->covered_s >= 0.0 && o->gaps >= 0 && o->events >= 0 && o->longest_gap_s >= 0.0,
                  "negative field in window %lld channel %d", (long long)idx[w], c);
            seen->sums[c] += o->integral;
        }
        for (s = 0; s < slots; s++) {
            states += st[w * slots + s];
        }
        CHECK(fabs(states - cw[w * NCH + 1].covered_s) <= 1e-9 * (1.0 + states),
              "state seconds %g != coverage %g", states, cw[w * NCH + 1].covered_s);
        CHECK(fw[w].energy_mj == cw[w * NCH + 0].integral * 36.292, "fuel energy");
    }
    integ_out_release(h);
}

static int run_once(int iteration) {
    integ_spec_t specs[NCH] = {{0}};
    integ_fuel_t fuel = {0, 36.292, 0.0741};
    double t[NCH], buf_t[CHUNK], a[CHUNK], b[CHUNK], c3[CHUNK], totals[NCH];
    uint8_t ok[CHUNK];
    integ_t *h;
    int err, ch, i, round;
    int64_t done, n;
    seen_t seen = {0, 0, {0}};
    double period = chance(50) ? 1.0 : uniform(0.05, 3.0);
    double origin = chance(50) ? 0.0 : uniform(-5.0, 5.0);
    double base = chance(50) ? 0.0 : 1.7e9;

    specs[0].kind = INTEG_RATE;
    specs[0].scale = 1.0 / 3600.0;
    specs[1].kind = INTEG_STATE;
    specs[1].n_states = 3;
    specs[2].kind = INTEG_EVENTS;
    specs[2].k = 7.4e-6;
    specs[2].dead_time = 1.1;
    specs[3].kind = INTEG_TANK;
    specs[3].volume_m3 = 0.44;
    specs[3].r_specific = 518.3;
    specs[3].p_pc = 46.0;
    specs[3].t_pc = 190.6;
    specs[3].refuel_kg = 2.0;
    specs[4].kind = INTEG_RATE;
    specs[4].scale = -1.0;
    for (ch = 0; ch < NCH; ch++) {
        specs[ch].max_gap = uniform(0.0, 2.0);
        t[ch] = base + uniform(-3.0, 3.0);
    }
    h = integ_new(NCH, specs, 1, &fuel, period, origin, chance(20) ? 3 : 2000, &err);
    if (h == NULL) {
        fprintf(stderr, "selftest: integ_new failed (%d) at iteration %d\n", err, iteration);
        return 1;
    }
    for (round = 0; round < 40; round++) {
        ch = (int)(next_u64() % NCH);
        n = (int64_t)(next_u64() % CHUNK);
        for (i = 0; i < n; i++) {
            if (chance(2)) {
                t[ch] += uniform(10.0, 1e6); /* a long outage */
            } else if (chance(5)) {
                t[ch] -= uniform(0.0, 1.0); /* out of order */
            } else if (!chance(5)) {
                t[ch] += uniform(0.0, 0.4); /* else a duplicate */
            }
            buf_t[i] = chance(1) ? odd_value(NAN) : t[ch];
            ok[i] = (uint8_t)!chance(10);
            a[i] = odd_value(uniform(-50.0, 250.0));
            b[i] = odd_value(uniform(0.0, 12.0));
            c3[i] = odd_value(uniform(150.0, 400.0));
        }
        switch (specs[ch].kind) {
        case INTEG_RATE:
            err = integ_push(h, ch, buf_t, a, ok, n, &done);
            break;
        case INTEG_STATE:
            for (i = 0; i < n; i++) {
                a[i] = chance(90) ? (double)(next_u64() % 5) : a[i];
            }
            err = integ_push(h, ch, buf_t, a, ok, n, &done);
            break;
        case INTEG_EVENTS:
            err = integ_push_events(h, ch, buf_t, b, b, c3, ok, n, &done);
            break;
        default:
            err = integ_push_tank(h, ch, buf_t, a, c3, ok, n, &done);
            break;
        }
        CHECK(err == INTEG_OK && done == n, "push failed (%d) at iteration %d", err, iteration);
        if (chance(30)) {
            check_windows(h, integ_pop(h, t[next_u64() % NCH] + uniform(-2.0, 4.0)), &seen);
        }
    }
    check_windows(h, integ_flush(h), &seen);
    integ_totals(h, totals);
    for (ch = 0; ch < NCH; ch++) {
        if (specs[ch].kind != INTEG_STATE) {
            CHECK(fabs(totals[ch] - seen.sums[ch]) <= 1e-6 * (1.0 + fabs(totals[ch])),
                  "channel %d: windows sum %g, total %g (iteration %d)", ch, seen.sums[ch],
                  totals[ch], iteration);
        }
    }
    /* Wrong kinds and bad arguments are refused without touching state. */
    CHECK(integ_push_one(h, 2, 0.0, 1.0, 1) == INTEG_EINVAL, "push_one to events channel");
    CHECK(integ_push_tank(h, 0, buf_t, a, c3, ok, 1, &done) == INTEG_EINVAL, "tank push to rate");
    CHECK(integ_pop(h, NAN) == INTEG_EINVAL, "NaN watermark");
    integ_free(h);
    return 0;
}

int main(int argc, char **argv) {
    int iterations = argc > 1 ? atoi(argv[1]) : 2000;
    int i;
    integ_spec_t bad = {0};
    int err;
    bad.kind = 99;
    CHECK(integ_new(1, &bad, 0, NULL, 1.0, 0.0, 10, &err) == NULL && err == INTEG_EINVAL,
          "bad kind accepted");
    CHECK(fabs(integ_dak_z(200.0 / 46.0, 300.0 / 190.6) - 0.8195) < 1e-3, "DAK Z");
    for (i = 0; i < iterations; i++) {
        if (run_once(i) != 0) {
            return 1;
        }
    }
    if (failures) {
        fprintf(stderr, "selftest: %d failures\n", failures);
        return 1;
    }
    printf("selftest: %d iterations passed\n", iterations);
    return 0;
}
