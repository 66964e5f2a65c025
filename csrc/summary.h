/*
 * The totals of one phase path: how memtrack.summary() (phase.c) and a
 * worker slot's summary (table/worker.c) add up phase ends, done once. Plain
 * C; the struct is also part of the shared slot layout (table/layout.h).
 */
#ifndef MEMTRACK_SUMMARY_H
#define MEMTRACK_SUMMARY_H

#include <stdint.h>

typedef struct {
    uint64_t count;
    double total_time;       /* seconds */
    uint64_t max_peak_rss;   /* bytes */
    uint64_t max_peak_delta; /* peak_rss - rss_start, bytes */
    int64_t total_rss_delta; /* rss_end - rss_start, summed */
} mt_phase_totals;

static inline void
mt_phase_totals_add(mt_phase_totals *t, double duration, uint64_t rss_start, uint64_t rss_end,
                    uint64_t peak_rss)
{
    uint64_t delta = peak_rss > rss_start ? peak_rss - rss_start : 0;
    t->count++;
    t->total_time += duration;
    if (peak_rss > t->max_peak_rss) {
        t->max_peak_rss = peak_rss;
    }
    if (delta > t->max_peak_delta) {
        t->max_peak_delta = delta;
    }
    t->total_rss_delta += (int64_t)rss_end - (int64_t)rss_start;
}

#endif /* MEMTRACK_SUMMARY_H */
