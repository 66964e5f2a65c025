/*
 * memtrack._core: the one header every C file includes.
 *
 * Layers: module.c (module definition, types, process set-up) calls
 * readings.c, peak.c, phase.c, table/ and pack.c; every file may call
 * errors.c (OSError, module state), none calls up into module.c; only
 * csrc/platform/<os>/ talks to the operating system, through the small
 * mt_os_* interface in platform/platform.h.
 */
#ifndef MEMTRACK_H
#define MEMTRACK_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <threads.h>

#include "platform/platform.h"
#include "summary.h"

#define MT_VERSION "0.1.0"

/* MT_PLATFORM_TESTED: whether this extension's suite has run on the
 * platform (capabilities()["platform_tested"]). Only Linux so far: the
 * Windows layer's C tests run under wine, the extension itself has not run
 * on a Windows CPython, and nothing has run on macOS (docs/platforms.md). */
#if defined(MEMTRACK_LINUX)
#define MT_PLATFORM "linux"
#define MT_PLATFORM_TESTED 1
#elif defined(MEMTRACK_MACOS)
#define MT_PLATFORM "macos"
#define MT_PLATFORM_TESTED 0
#elif defined(MEMTRACK_WINDOWS)
#define MT_PLATFORM "windows"
#define MT_PLATFORM_TESTED 0
#else
#error "setup.py defines one of MEMTRACK_LINUX, MEMTRACK_MACOS, MEMTRACK_WINDOWS"
#endif

/* Longest phase name in UTF-8 bytes, and deepest nesting that gets its own
 * path; deeper phases are measured and recorded under their deepest
 * ancestor's path (documented in docs/api.md). */
#define MT_MAX_NAME 255
#define MT_MAX_DEPTH 64
/* Longest phase path kept; a phase whose path would be longer is recorded
 * under its parent's path, as a phase nested deeper than MT_MAX_DEPTH is. */
#define MT_MAX_PATH 1024
/* Distinct paths one process can hold; more go to the "(overflow)" path. */
#define MT_MAX_PATHS 65536
#define MT_DEFAULT_RECORDS 100000
/* The range of every interval memtrack accepts (a worker's heartbeat, the
 * recorder's sampling), in seconds; exported as _core.MIN/MAX_INTERVAL. */
#define MT_MIN_INTERVAL 0.001
#define MT_MAX_INTERVAL 3600.0

/* ------------------------------------------------------------------------ */
/* Module state (PEP 489): the heap types and the exception.                */

typedef struct {
    PyTypeObject *Sample;
    PyTypeObject *Footprint;
    PyTypeObject *PhaseStats;
    PyTypeObject *PhaseSummary;
    PyTypeObject *Phase;
    PyTypeObject *WorkerStats;
    PyTypeObject *Segment;
    PyObject *ProfileError;
    PyObject *TableError;
} mt_state;

extern PyModuleDef mt_module_def;
/* errors.c: the module state of one of our heap types (NULL with an error). */
mt_state *mt_state_from_type(PyTypeObject *tp);

/* Raise OSError (the errno subclass) naming the failing call and path. */
void mt_raise_os(int err, const char *syscall, const char *path);

static inline void
mt_raise_oserr(const mt_oserr *e)
{
    mt_raise_os(e->err, e->syscall, e->path);
}



/* ------------------------------------------------------------------------ */
/* peak.c: the exact-peak machinery, shared by phases and reset_peak().     */

typedef enum {
    MT_PEAK_KERNEL = 0,  /* kernel high-water mark, reset per phase: exact */
    MT_PEAK_SAMPLER = 1, /* native sampling thread: bounded error */
} mt_peak_method;

int mt_peak_init(mt_oserr *e);
mt_peak_method mt_peak_method_in_force(void);
const char *mt_peak_fallback_reason(void);
double mt_peak_sampler_interval(void);
/* Force the sampler (MEMTRACK_PEAK=sampler, or a refused reset). */
int mt_peak_use_sampler(const char *reason, mt_oserr *e);
/* phase_lock held for both. read: the mark (and rss when `rss` is not NULL,
 * from the same reading where the status file is read). reset: reads the mark
 * about to be lost into *lost, resets it, reads rss. Neither folds into the
 * open phases: the caller does (mt_phase_fold_locked), so that peak.c never
 * calls up into phase.c. */
int mt_peak_read_locked(uint64_t *peak, uint64_t *rss, mt_oserr *e);
int mt_peak_reset_locked(uint64_t *lost, uint64_t *rss_after, mt_oserr *e);
void mt_peak_after_fork_child(void);
/* Running maxima of every reading (every reset reads first, so nothing is
 * lost): since the process or worker slot started (the slot's peak_rss),
 * and since the last reset_peak() (what peak_rss() returns). */
uint64_t mt_peak_lifetime_locked(void);
void mt_peak_restart_lifetime_locked(uint64_t from);
uint64_t mt_peak_user_locked(void);
/* The exact peak since the previous call (then resets the mark: *lost is the
 * mark it read, for the caller to fold), and rss. */
int mt_peak_take_window_locked(uint64_t *window, uint64_t *lost, uint64_t *rss, mt_oserr *e);
void mt_peak_restart_user_locked(uint64_t from);

/* ------------------------------------------------------------------------ */
/* phase.c: the phase stack, the open-phase registry, records and summary.   */

extern mtx_t mt_phase_lock;
extern atomic_bool mt_disabled;
int mt_phase_init(void);
void mt_phase_after_fork_child(void);
/* Fold a high-water mark into every open phase and watch; phase_lock held.
 * Every caller of mt_peak_reset_locked() calls it with the mark it lost. */
void mt_phase_fold_locked(uint64_t hwm);
/* Reset the kernel's mark after folding the lost one into the open phases;
 * rss after the reset. phase_lock held. */
int mt_phase_reset_peak_locked(uint64_t *rss_after, mt_oserr *e);
/* Path of the most recently entered phase still open, "" for none. */
void mt_phase_current_locked(char *buf, size_t size);
extern PyType_Spec mt_phase_spec;
extern PyType_Spec mt_watch_spec;
PyObject *mt_summary(PyObject *module, PyObject *unused);
PyObject *mt_records(PyObject *module, PyObject *unused);
PyObject *mt_reset(PyObject *module, PyObject *unused);
PyObject *mt_configure(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *mt_pack_phase_records(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *mt_phase_counters(PyObject *module, PyObject *unused);
PyObject *mt_phase_summary_new(mt_state *st, const mt_phase_totals *t);

/* Path of the calling thread's innermost open phase as an id (0: none);
 * reads only the thread's own stack, no lock (alloc.c calls it in hooks). */
uint32_t mt_phase_current_path_id(void);
/* The path of an id from mt_phase_current_path_id(); the string is never
 * freed. Takes phase_lock. */
const char *mt_phase_path_of(uint32_t id);

/* ------------------------------------------------------------------------ */
/* alloc.c: allocation attribution (PEP 445 hooks, sampling by bytes).       */

#define MT_ALLOC_MAX_FRAMES 64

enum { MT_ALLOC_THREAD_NEW = 0, MT_ALLOC_THREAD_LISTED = 1, MT_ALLOC_THREAD_ENDED = 2 };

/* One thread's allocation state. Only its own thread reads or writes it,
 * except pub_bytes/pub_count (atomics: what counters() reads of another
 * thread) and prev/next (Protected by alloc.c's threads_lock). The hot path
 * touches two fields: count, and the countdown to the next sample, from
 * which the bytes follow: bytes = bytes_base + (drawn - countdown). */
typedef struct mt_alloc_thread {
    uint64_t count;      /* exact: every accounted allocation */
    int64_t countdown;   /* bytes left before the next sample */
    uint64_t bytes_base; /* bytes accounted before the current countdown */
    int64_t drawn;       /* the countdown as it was drawn */
    /* This thread's exact figures as of its latest sample (or start). */
    _Atomic uint64_t pub_bytes, pub_count;
    uint64_t rng;
    uint64_t ordinal;
    unsigned long ident;
    unsigned gen;
    int guard; /* memtrack is allocating: the hooks only forward */
    int state; /* MT_ALLOC_THREAD_* */
    struct mt_alloc_thread *prev, *next;
} mt_alloc_thread;

/* Every allocation reads this thread-local: the initial-exec model makes that
 * one load from the thread pointer instead of a call to __tls_get_addr (it
 * takes a few bytes of the static TLS that glibc keeps for loaded modules). */
#if defined(__GNUC__)
#define MT_TLS_FAST __attribute__((tls_model("initial-exec")))
#else
#define MT_TLS_FAST
#endif
extern MT_TLS_FAST _Thread_local mt_alloc_thread mt_alloc_tls;
/* 0 while tracking is off, else a number that changes with every start(). */
extern atomic_uint mt_alloc_session;
extern mtx_t mt_alloc_sample_lock;

/* What a phase reads at enter and exit: this thread's exact counters. */
static inline void
mt_alloc_thread_counts(uint64_t *bytes, uint64_t *count)
{
    const mt_alloc_thread *t = &mt_alloc_tls;
    *bytes = t->bytes_base + (uint64_t)(t->drawn - t->countdown);
    *count = t->count;
}

int mt_alloc_init(void);
void mt_alloc_before_fork(void);
void mt_alloc_after_fork_parent(void);
void mt_alloc_after_fork_child(void);
PyObject *mt_alloc_start(PyObject *module, PyObject *args, PyObject *kwargs);
PyObject *mt_alloc_stop(PyObject *module, PyObject *unused);
PyObject *mt_alloc_clear(PyObject *module, PyObject *unused);
PyObject *mt_alloc_counters(PyObject *module, PyObject *unused);
PyObject *mt_alloc_sites(PyObject *module, PyObject *unused);
PyObject *mt_alloc_install_numpy(PyObject *module, PyObject *capsule);
PyObject *mt_alloc_uninstall_numpy(PyObject *module, PyObject *unused);

/* ------------------------------------------------------------------------ */
/* table/: the worker table. worker.c (this process's slot) and reader.c. */

typedef struct {
    const char *path; /* the ended phase */
    size_t path_len;
    const char *parent_path; /* the thread's enclosing phase, "" for none */
    size_t parent_len;
    uint32_t parent_depth;
    int outermost;  /* depth 1: a task ended */
    int still_open; /* other phases still open in the process */
    uint64_t rss_start, rss_end, peak_rss;
    uint64_t heap_used; /* 0: not read (configure(phase_heap=False), the default) */
    double duration;
} mt_worker_exit;


/* The reader the recorder (sampler.c) reads a table through: Python-free,
 * so its native thread calls it without the GIL. It owns its mapping (the
 * capacity and size copied once at open and never re-read), the pidfd
 * watches of the slot owners and one snapshot buffer. Not thread-safe: one
 * thread uses a reader at a time. */
typedef struct mt_reader mt_reader;

/* What the recorder needs of a slot. */
typedef struct {
    uint32_t slot;
    int64_t pid;
    const char *state; /* "idle", "running", "exited", "killed" */
    int alive;
    uint64_t rss, peak_rss, uss, pss, tasks, last_task_rss;
    double last_task_time, joined;
    int has_exit_code, has_exit_signal;
    int32_t exit_code, exit_signal;
    char phase[256]; /* valid UTF-8: invalid bytes became U+FFFD (cut to fit) */
    int role;        /* as the process declared it in its slot: 0 worker (table/layout.h) */
    /* The slot's ring of recent task ends (outermost phase ends), oldest
     * first: ends[0..nends) are the last nends of ends_written. */
    uint64_t ends_written;
    uint32_t nends;
    struct {
        double time;
        uint64_t retained, peak_rss;
        char path[104]; /* its phase path, "" when not in the slot's summary */
    } ends[16];
} mt_worker_view;

/* NULL on failure: *why says what is wrong with the table (a static
 * string), or is NULL and *e holds the OS error. */
mt_reader *mt_reader_open(const char *name, const char **why, mt_oserr *e);
void mt_reader_close(mt_reader *r);
uint32_t mt_reader_capacity(const mt_reader *r);
/* One snapshot of every claimed slot, within the reader's time budget (it
 * may sleep: call it without the GIL). 0, or -1 when the table is damaged
 * (resized or its header rewritten): nothing of it can be trusted. */
int mt_reader_scan(mt_reader *r);
/* Slot i of the last scan: 0 a worker (liveness settled), 1 free or busy,
 * -1 corrupt. */
int mt_reader_view(mt_reader *r, uint32_t i, mt_worker_view *v);
/* The largest peak of slot i since the previous call (0: none). */
uint64_t mt_reader_take_window(mt_reader *r, uint32_t i);

/* The pool's memory as one figure: a process's pss once it has been read,
 * its rss before that (pss 0 means not read yet). totals() and the
 * recorder's pool records both use it. */
static inline uint64_t
mt_pool_memory(uint64_t pss, uint64_t rss)
{
    return pss ? pss : rss;
}

int mt_worker_init(void);
void mt_worker_after_fork_child(void);
int mt_worker_joined_locked(void);
void mt_worker_on_enter_locked(const char *path, size_t len, uint32_t depth, uint64_t rss);
void mt_worker_on_exit_locked(const mt_worker_exit *x, int *entry_cache, uint32_t *entry_gen);
extern PyType_Spec mt_segment_spec;
extern PyType_Spec mt_worker_stats_spec; /* table/reader.c: a view of one slot */
extern PyType_Spec mt_recorder_spec; /* sampler.c */
PyObject *mt_oom_kills_py(PyObject *module, PyObject *pid);
PyObject *mt_worker_join(PyObject *module, PyObject *name);
PyObject *mt_worker_rejoin(PyObject *module, PyObject *unused);
PyObject *mt_worker_leave(PyObject *module, PyObject *unused);
PyObject *mt_worker_task_done(PyObject *module, PyObject *unused);
PyObject *mt_worker_info(PyObject *module, PyObject *unused);
PyObject *mt_worker_set_heartbeat(PyObject *module, PyObject *seconds);
PyObject *mt_worker_set_role(PyObject *module, PyObject *role);
PyObject *mt_segment_creator(PyObject *module, PyObject *name);
PyObject *mt_proc_identity(PyObject *module, PyObject *pid);
PyObject *mt_unlink_segment(PyObject *module, PyObject *name);
/* table/names.c: which tables exist, through the platform (mt_os_shm_list). */
PyObject *mt_list_segments(PyObject *module, PyObject *prefix);
PyObject *mt_segment_exists(PyObject *module, PyObject *name);

/* ------------------------------------------------------------------------ */
/* pack.c: msgpack through msgpack-c.                                        */

/* readings.c */
PyObject *mt_rss(PyObject *module, PyObject *unused);
PyObject *mt_peak_rss(PyObject *module, PyObject *unused);
PyObject *mt_reset_peak(PyObject *module, PyObject *unused);
PyObject *mt_snapshot(PyObject *module, PyObject *unused);
PyObject *mt_footprint_py(PyObject *module, PyObject *unused);
PyObject *mt_capabilities(PyObject *module, PyObject *unused);
PyObject *mt_memory_limit_py(PyObject *module, PyObject *unused);

PyObject *mt_pack(PyObject *module, PyObject *obj);
PyObject *mt_unpack_stream(PyObject *module, PyObject *data);

/* pack.c helpers that phase.c uses to write records without Python objects */
typedef struct mt_packer mt_packer;
mt_packer *mt_packer_new(void);
void mt_packer_free(mt_packer *p);
PyObject *mt_packer_bytes(mt_packer *p);
size_t mt_packer_size(const mt_packer *p);
const char *mt_packer_data(const mt_packer *p);
void mt_packer_clear(mt_packer *p);
int mt_pack_map(mt_packer *p, size_t n);
int mt_pack_array(mt_packer *p, size_t n);
int mt_pack_key(mt_packer *p, const char *key);
int mt_pack_str(mt_packer *p, const char *s, size_t len);
int mt_pack_u64(mt_packer *p, uint64_t v);
int mt_pack_i64(mt_packer *p, int64_t v);
int mt_pack_double(mt_packer *p, double v);
int mt_pack_nil(mt_packer *p);
int mt_pack_bool(mt_packer *p, int v);


/* smaps_rollup walks every resident page: ~10 ms per GiB here. Reading it on
 * a timer would cost a 1 GB worker 1% of its CPU, so every periodic reading
 * keeps to a budget: after a read that took T seconds, the next waits at least
 * T / MT_FOOTPRINT_BUDGET (0.2% of one core). */
#define MT_FOOTPRINT_BUDGET 0.002
typedef struct {
    double next; /* CLOCK_MONOTONIC time of the next allowed reading */
} mt_budget;
/* Read a footprint (pid 0: this process) if the budget and `min_gap` allow. */
int mt_budgeted_footprint(mt_budget *b, long pid, double min_gap, mt_footprint *f);

#endif /* MEMTRACK_H */
