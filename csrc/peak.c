/*
 * Exact peaks. The kernel keeps a high-water mark of RSS per process;
 * writing 5 to /proc/self/clear_refs resets it to the current RSS. A phase
 * resets it on entry and reads it on exit. Because phases nest and run in
 * several threads, every reset first reads the mark about to be lost and
 * hands it back to the caller, which folds it into every open phase
 * (phase.c), so no phase loses a peak to another's reset. This file never
 * calls up into phase.c: it reads, resets and keeps the running maxima.
 *
 * Where the reset is refused, a native thread samples RSS (without the GIL)
 * and keeps a software mark instead: the error is bounded by what can be
 * allocated and freed within one sampling interval.
 */
#include "memtrack.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Slack for the sticky-floor test below: RSS may grow between two reads. */
#define STICKY_SLACK (64u * 1024u)
#define SAMPLER_INTERVAL 0.001

static struct {
    /* Written under phase_lock; read anywhere (capabilities()). */
    _Atomic int method;
    char reason[160]; /* Protected by phase_lock (written once per switch). */
    /* getrusage's ru_maxrss is max(high-water mark, signal->maxrss). The
     * kernel sets signal->maxrss at exec (to the peak of the image the
     * process replaced) and at group exit, never at a reset. So it is one
     * constant per exec'd image: measured once at start, 0 in a forked child.
     * A reading at or below it says nothing; the exact (slower)
     * /proc/self/status read is used then. Protected by phase_lock. */
    uint64_t sticky_floor;
    /* The last exact reading was above the floor, so getrusage is worth
     * asking first. Below it (a small spawn worker of a large parent) the
     * status file alone gives both the mark and rss in one read, with no
     * getrusage and no statm read. Protected by phase_lock. */
    bool above_floor;
    /* The sampler's high-water mark: raised by the sampler thread, lowered
     * by a reset under phase_lock; atomic so that both can touch it. */
    _Atomic uint64_t soft_hwm;
    _Atomic bool sampler_running; /* cleared to stop, and in a forked child */
    thrd_t sampler;               /* Protected by phase_lock. */
    double interval;              /* Written once at init. */
    /* Every reading of the mark raises these; every reset is preceded by a
     * reading, so no peak between two resets is lost. Protected by
     * phase_lock. */
    uint64_t lifetime;  /* since the process (or worker slot) started */
    uint64_t user_peak; /* since the last reset_peak(): what peak_rss() says */
    uint64_t window;    /* since the recorder last took it */
} peak = {.method = MT_PEAK_KERNEL, .interval = SAMPLER_INTERVAL};

static void
raise_soft_hwm(uint64_t value)
{
    uint64_t seen = atomic_load(&peak.soft_hwm);
    while (value > seen && !atomic_compare_exchange_weak(&peak.soft_hwm, &seen, value)) {
    }
}

static int
sampler_main(void *unused)
{
    (void)unused;
    while (atomic_load(&peak.sampler_running)) {
        uint64_t rss;
        mt_oserr e;
        if (mt_os_rss(&rss, &e) == 0) {
            raise_soft_hwm(rss);
        }
        mt_os_sleep(peak.interval);
    }
    return 0;
}

/* phase_lock held, or no other thread can run (init). */
static int
start_sampler(mt_oserr *e)
{
    if (atomic_load(&peak.sampler_running)) {
        return 0;
    }
    uint64_t rss;
    if (mt_os_rss(&rss, e) < 0) {
        return -1;
    }
    raise_soft_hwm(rss);
    atomic_store(&peak.sampler_running, true);
    if (thrd_create(&peak.sampler, sampler_main, NULL) != thrd_success) {
        atomic_store(&peak.sampler_running, false);
        return mt_fail(e, "pthread_create", NULL, EAGAIN);
    }
    thrd_detach(peak.sampler);
    return 0;
}

int
mt_peak_use_sampler(const char *reason, mt_oserr *e)
{
    snprintf(peak.reason, sizeof peak.reason, "%s", reason);
    atomic_store(&peak.method, MT_PEAK_SAMPLER);
    return start_sampler(e);
}

/* Right after a reset the mark equals RSS; a larger ru_maxrss is the
 * exec floor. RSS may grow between the two reads, hence the slack. */
static int
measure_sticky_floor(mt_oserr *e)
{
    uint64_t hwm, rss;
    if (mt_os_reset_hwm(e) < 0 || mt_os_rss(&rss, e) < 0 || mt_os_hwm(&hwm, e) < 0) {
        return -1;
    }
    peak.sticky_floor = hwm > rss + STICKY_SLACK ? hwm : 0;
    peak.lifetime = peak.user_peak = rss;
    return 0;
}

int
mt_peak_init(mt_oserr *e)
{
    const char *forced = getenv("MEMTRACK_PEAK");
    const char *interval = getenv("MEMTRACK_SAMPLER_INTERVAL");
    if (interval != NULL) {
        double v = strtod(interval, NULL);
        if (v >= 1e-5 && v <= 1.0) {
            peak.interval = v;
        }
    }
    if (forced != NULL && strcmp(forced, "sampler") == 0) {
        return mt_peak_use_sampler("MEMTRACK_PEAK=sampler", e);
    }
    mt_oserr refused;
    if (mt_os_reset_hwm(&refused) < 0) {
        char reason[160];
        snprintf(reason, sizeof reason, "%s %s refused: %s", refused.syscall,
                 refused.path ? refused.path : "", strerror(refused.err));
        return mt_peak_use_sampler(reason, e);
    }
    return measure_sticky_floor(e);
}

mt_peak_method
mt_peak_method_in_force(void)
{
    return (mt_peak_method)atomic_load(&peak.method);
}

const char *
mt_peak_fallback_reason(void)
{
    return mt_peak_method_in_force() == MT_PEAK_SAMPLER ? peak.reason : NULL;
}

double
mt_peak_sampler_interval(void)
{
    return peak.interval;
}

static void
note_mark_locked(uint64_t hwm)
{
    if (hwm > peak.lifetime) {
        peak.lifetime = hwm;
    }
    if (hwm > peak.user_peak) {
        peak.user_peak = hwm;
    }
    if (hwm > peak.window) {
        peak.window = hwm;
    }
}

/* The mark, and rss when `rss` is not NULL, in the fewest system calls:
 * getrusage (+ statm) above the sticky floor, the status file alone below. */
static int
read_mark_locked(uint64_t *hwm, uint64_t *rss, mt_oserr *e)
{
    uint64_t status_rss;
    if (mt_peak_method_in_force() == MT_PEAK_SAMPLER) {
        uint64_t now;
        if (start_sampler(e) < 0 || mt_os_rss(&now, e) < 0) {
            return -1;
        }
        raise_soft_hwm(now);
        *hwm = atomic_load(&peak.soft_hwm);
        if (rss != NULL) {
            *rss = now;
        }
        return 0;
    }
    if (peak.sticky_floor == 0 || peak.above_floor) {
        if (mt_os_hwm(hwm, e) < 0) {
            return -1;
        }
        if (peak.sticky_floor == 0 || *hwm > peak.sticky_floor) {
            return rss != NULL ? mt_os_rss(rss, e) : 0;
        }
    }
    if (mt_os_hwm_exact(hwm, &status_rss, e) < 0) {
        return -1;
    }
    peak.above_floor = *hwm > peak.sticky_floor;
    if (rss != NULL) {
        *rss = status_rss;
    }
    return 0;
}

int
mt_peak_read_locked(uint64_t *out, uint64_t *rss, mt_oserr *e)
{
    if (read_mark_locked(out, rss, e) < 0) {
        return -1;
    }
    note_mark_locked(*out);
    return 0;
}

int
mt_peak_take_window_locked(uint64_t *window, uint64_t *lost, uint64_t *rss, mt_oserr *e)
{
    /* The reset reads the mark first, so the window holds it. */
    if (mt_peak_reset_locked(lost, rss, e) < 0) {
        return -1;
    }
    *window = peak.window;
    /* The next window holds only what comes after now. */
    peak.window = *rss;
    return 0;
}

uint64_t
mt_peak_lifetime_locked(void)
{
    return peak.lifetime;
}

void
mt_peak_restart_lifetime_locked(uint64_t from)
{
    peak.lifetime = from;
}

uint64_t
mt_peak_user_locked(void)
{
    return peak.user_peak;
}

void
mt_peak_restart_user_locked(uint64_t from)
{
    peak.user_peak = from;
}

int
mt_peak_reset_locked(uint64_t *lost, uint64_t *rss_after, mt_oserr *e)
{
    uint64_t rss;
    /* Read the mark about to be lost: it raises the lifetime and user
     * peaks here, and the caller folds it into the open phases. */
    if (mt_peak_read_locked(lost, NULL, e) < 0) {
        return -1;
    }
    if (mt_peak_method_in_force() == MT_PEAK_KERNEL) {
        mt_oserr refused;
        if (mt_os_reset_hwm(&refused) < 0) {
            /* Refused now (a seccomp filter installed later, say): switch. */
            char reason[160];
            snprintf(reason, sizeof reason, "%s %s refused: %s", refused.syscall,
                     refused.path ? refused.path : "", strerror(refused.err));
            if (mt_peak_use_sampler(reason, e) < 0) {
                return -1;
            }
        }
    }
    if (mt_os_rss(&rss, e) < 0) {
        return -1;
    }
    if (mt_peak_method_in_force() == MT_PEAK_SAMPLER) {
        if (start_sampler(e) < 0) { /* restarts it in a forked child */
            return -1;
        }
        atomic_store(&peak.soft_hwm, rss);
    }
    *rss_after = rss;
    return 0;
}

void
mt_peak_after_fork_child(void)
{
    /* The sampler thread did not survive fork(); the next read restarts it.
     * A forked child's ru_maxrss floor is 0 (its signal struct is new), and
     * its peaks start at its own memory. */
    atomic_store(&peak.sampler_running, false);
    peak.sticky_floor = 0;
    peak.above_floor = false;
    uint64_t rss = 0;
    mt_oserr ignored;
    if (mt_os_rss(&rss, &ignored) == 0) { /* descriptors reopened already */
        peak.lifetime = peak.user_peak = rss;
    }
}
