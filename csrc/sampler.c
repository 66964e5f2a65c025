/*
 * The recorder behind memtrack.record(): a native thread (it never takes
 * the GIL) that, every interval, samples this process (rss, the exact peak
 * since the previous sample, pss at a lower rate), every slot of a worker
 * table, and optionally every descendant of a process through /proc, and
 * appends msgpack records (docs/format.md) to a file through msgpack-c.
 *
 * Records are written in whole-record chunks (every second or 64 KiB), so a
 * run killed with SIGKILL leaves a file readable up to its last chunk.
 */
#include "memtrack.h"

#include <stdio.h>
#include <string.h>

#define FLUSH_BYTES (64u * 1024u)
#define FLUSH_SECONDS 1.0
#define MAX_PROCS 4096
#define MAX_OOM_FILES 16
/* A process is re-examined for a helper's traits (a listening socket) in
 * these first rounds: a Manager starts to listen a moment after it starts. */
#define ROLE_RECHECK_ROUNDS 16

/* What a process is to the run (docs/report.md, "Roles"). Decided here, once,
 * and written into every sample, event and final record of the process. */
typedef enum {
    ROLE_TOOL = 0, /* memtrack itself (memtrack run): in no figure */
    ROLE_ROOT,     /* the command (or the process that records its own pool) */
    ROLE_WORKER,   /* a pool worker: counted, sized, analysed */
    ROLE_HELPER,   /* resource tracker, forkserver, Manager server */
    ROLE_OTHER,    /* any other descendant */
} mt_role;

static const char *const role_names[] = {"tool", "root", "worker", "helper", "other"};

/* PSS between two readings of smaps_rollup (slow, so read at a lower rate):
 * the last reading plus what the RSS change since adds to it (docs/report.md,
 * "Fresh PSS"). Pages a process adds to its anonymous RSS are new private
 * pages (copy-on-write copies too): they count whole. File pages it maps are
 * often shared (libraries, the interpreter, with the other workers), so they
 * count at the share file pages had in the last reading. */
typedef struct {
    mt_budget budget;
    int have;                           /* a reading was made */
    uint64_t pss, uss, anon, file;      /* at that reading */
} mt_pss_track;

/* A kernel OOM-kill counter (a cgroup's, or the host's) and the kills of it
 * already put down to a death. */
typedef struct {
    char file[256];
    int64_t counted;
} mt_oom_counter;

/* What the recorder last saw of a slot, to turn changes into events. */
typedef struct {
    int64_t pid; /* 0: nothing seen */
    const char *state;
    uint64_t ends_read;    /* task ends of its ring already written as events */
    uint64_t ends_dropped; /* task ends the ring overwrote before we read them */
    char phase[256];
    mt_role role;
    uint64_t rounds;
    mt_pss_track pss;
    int oom; /* index into oom_counters, -1: none */
} mt_seen_slot;

typedef struct {
    long pid, ppid;
    mt_role role;
    int forkserver; /* runs multiprocessing.forkserver's main */
    uint64_t rss, max_hwm, pss, uss;
    int have_pss;
    mt_pss_track track;
    int present;     /* seen in this round */
    uint64_t rounds; /* rounds it has been seen in */
    double joined, updated;
    int oom;
    int has_exit;
    int exit_code, exit_signal;
} mt_seen_proc;

typedef struct {
    PyObject_HEAD
        /* Set before the thread starts and read-only while it runs. */
        int fd;
    double interval;
    int pss_every;
    long root_pid;
    mt_role self_role;
    mt_reader *table; /* NULL: no table */
    uint32_t capacity;
    /* Owned by the thread while it runs (the reader too; stop() reads seen after). */
    mt_seen_slot *seen;
    mt_worker_view view;
    mt_seen_proc *procs;
    size_t nprocs;
    long *tree, *tree_parent;
    mt_packer *pk;
    mt_pss_track self_pss;
    mt_oom_counter oom_counters[MAX_OOM_FILES];
    int noom;
    int sharing_changed, sharing_changes; /* a process joined or left: this round, the next */
    size_t packed; /* bytes in pk not yet written */
    double last_flush;
    uint64_t beat;
    /* Protected by lock: the stop request, the status, the write error. */
    mtx_t lock;
    cnd_t wake;
    int stop;
    int running;
    long owner_pid; /* the process whose thread this is */
    thrd_t thread;
    uint64_t samples, records, bytes;
    uint32_t live;
    uint64_t pool_rss, pool_pss, pool_peak, max_pool_pss, max_pool_peak, self_rss;
    uint64_t root_pss, max_root_pss;
    mt_oserr write_error;
    int failed;
} RecorderObject;

/* ------------------------------------------------------------------------ */
/* Packing helpers: maps of known size, built key by key.                    */

static int
pack_str_or_nil(mt_packer *pk, const char *s)
{
    return (s == NULL || s[0] == '\0') ? mt_pack_nil(pk) : mt_pack_str(pk, s, strlen(s));
}

/* `pss_state`: 1 read in this round, 0 estimated, -1 not known yet. */
static int
pack_sample(mt_packer *pk, double time, long pid, const char *source, mt_role role, uint64_t rss,
            uint64_t peak, int pss_state, uint64_t pss, uint64_t uss, const char *phase)
{
    int rc = mt_pack_map(pk, 11);
    rc |= mt_pack_key(pk, "t") | mt_pack_key(pk, "sample");
    rc |= mt_pack_key(pk, "time") | mt_pack_double(pk, time);
    rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, pid);
    rc |= mt_pack_key(pk, "source") | mt_pack_key(pk, source);
    rc |= mt_pack_key(pk, "role") | mt_pack_key(pk, role_names[role]);
    rc |= mt_pack_key(pk, "rss") | mt_pack_u64(pk, rss);
    rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, peak > rss ? peak : rss);
    rc |= mt_pack_key(pk, "pss") | (pss_state >= 0 ? mt_pack_u64(pk, pss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "uss") | (pss_state >= 0 ? mt_pack_u64(pk, uss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "pss_estimated") | mt_pack_bool(pk, pss_state == 0);
    rc |= mt_pack_key(pk, "phase") | pack_str_or_nil(pk, phase);
    return rc;
}

static int
pack_event(mt_packer *pk, double time, const char *kind, const mt_worker_view *v, long pid,
           mt_role role, const char *phase, uint64_t rss, uint64_t peak, int oom)
{
    int rc = mt_pack_map(pk, 13);
    rc |= mt_pack_key(pk, "t") | mt_pack_key(pk, "event");
    rc |= mt_pack_key(pk, "time") | mt_pack_double(pk, time);
    rc |= mt_pack_key(pk, "kind") | mt_pack_key(pk, kind);
    rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, pid);
    rc |= mt_pack_key(pk, "role") | mt_pack_key(pk, role_names[role]);
    rc |= mt_pack_key(pk, "slot") | (v ? mt_pack_u64(pk, v->slot) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "phase") | pack_str_or_nil(pk, phase);
    rc |= mt_pack_key(pk, "rss") | mt_pack_u64(pk, rss);
    rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, peak);
    rc |= mt_pack_key(pk, "exit_code") |
          ((v && v->has_exit_code) ? mt_pack_i64(pk, v->exit_code) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "exit_signal") |
          ((v && v->has_exit_signal) ? mt_pack_i64(pk, v->exit_signal) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "state") | (v ? mt_pack_key(pk, v->state) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "oom") | mt_pack_bool(pk, oom);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Fresh PSS, roles, and the OOM killer's counters.                          */

static uint64_t
plus(uint64_t base, double change)
{
    double v = (double)base + change;
    return v > 0 ? (uint64_t)v : 0;
}

/* 1: read now, 0: estimated from the RSS change, -1: never read. */
static int
track_pss(mt_pss_track *t, long pid, double min_gap, uint64_t rss, uint64_t anon, uint64_t *pss,
          uint64_t *uss)
{
    mt_footprint fp;
    anon = anon < rss ? anon : rss;
    uint64_t file = rss - anon;
    /* When the RSS moved by an eighth since the last reading, the estimate may
     * have drifted: read again as soon as the CPU budget allows. */
    uint64_t moved = (anon > t->anon ? anon - t->anon : t->anon - anon) +
                     (file > t->file ? file - t->file : t->file - file);
    if (t->have && moved * 8 > rss) {
        min_gap = 0;
    }
    if (mt_budgeted_footprint(&t->budget, pid, min_gap, &fp)) {
        t->have = 1;
        t->pss = fp.pss;
        t->uss = fp.uss;
        t->anon = anon;
        t->file = file;
        *pss = fp.pss;
        *uss = fp.uss;
        return 1;
    }
    if (!t->have) {
        return -1;
    }
    double d_anon = (double)anon - (double)t->anon, d_file = (double)file - (double)t->file;
    /* What a file page counted for in the last reading: PSS beyond the
     * anonymous pages, per file page (0 to 1). */
    double share = 0, private_share = 0;
    if (t->file > 0) {
        share = ((double)t->pss - (double)t->anon) / (double)t->file;
        private_share = ((double)t->uss - (double)t->anon) / (double)t->file;
    }
    share = share < 0 ? 0 : share > 1 ? 1 : share;
    private_share = private_share < 0 ? 0 : private_share > 1 ? 1 : private_share;
    *pss = plus(t->pss, d_anon + d_file * share);
    *uss = plus(t->uss, d_anon + d_file * private_share);
    return 0;
}

/* The least time between two PSS readings of a process. When a process
 * joined or left in the previous round, pages changed hands (a fork shares
 * the parent's pages, an exit leaves them to the others) without any RSS
 * changing: every process is read again as soon as its budget allows. */
static double
pss_gap(const RecorderObject *r)
{
    return r->sharing_changed ? 0.0 : r->pss_every * r->interval;
}

static int
is_power_of_two(uint64_t n)
{
    return n != 0 && (n & (n - 1)) == 0;
}

/* The counter `pid`'s kills are counted in, added on first sight: -1 none. */
static int
oom_counter_of(RecorderObject *r, long pid)
{
    char file[256];
    if (mt_os_oom_counter_file(pid, file, sizeof file) < 0) {
        return -1;
    }
    for (int i = 0; i < r->noom; i++) {
        if (strcmp(r->oom_counters[i].file, file) == 0) {
            return i;
        }
    }
    int64_t now = mt_os_oom_kills(file);
    if (r->noom == MAX_OOM_FILES || now < 0) {
        return -1;
    }
    mt_oom_counter *c = &r->oom_counters[r->noom];
    memcpy(c->file, file, sizeof c->file);
    c->counted = now;
    return r->noom++;
}

/* A process counted in counter `i` died by SIGKILL (or unseen): was it the
 * OOM killer? Yes when the counter rose past the kills already put down to
 * other deaths; this one is then counted too. */
static int
oom_killed(RecorderObject *r, int i)
{
    if (i < 0) {
        return 0;
    }
    mt_oom_counter *c = &r->oom_counters[i];
    int64_t now = mt_os_oom_kills(c->file);
    if (now > c->counted) {
        c->counted++;
        return 1;
    }
    return 0;
}

static mt_seen_proc *
known_proc(RecorderObject *r, long pid)
{
    for (size_t i = 0; i < r->nprocs; i++) {
        if (r->procs[i].pid == pid) {
            return &r->procs[i];
        }
    }
    return NULL;
}

static int
has_helper_command(const char *cmd)
{
    return strstr(cmd, "multiprocessing.resource_tracker") != NULL ||
           strstr(cmd, "multiprocessing.semaphore_tracker") != NULL;
}

/* The role of a descendant seen through /proc: what it runs, what it holds,
 * whose child it is. `forkserver` is set when it is a forkserver. */
static mt_role
classify_proc(RecorderObject *r, long pid, long ppid, int *forkserver)
{
    static const char marker[] = "multiprocessing.forkserver";
    char cmd[2048];
    *forkserver = 0;
    if (pid == r->root_pid) {
        return ROLE_ROOT;
    }
    long n = mt_os_proc_cmdline(pid, cmd, sizeof cmd);
    if (n > 0 && has_helper_command(cmd)) {
        return ROLE_HELPER;
    }
    /* The forkserver's children are forked from it and run its command line
     * too: a worker is a child of a forkserver, the forkserver is not. The
     * parent may have been first seen before it exec'd the forkserver. */
    const mt_seen_proc *parent = known_proc(r, ppid);
    int in_forkserver = n > 0 && strstr(cmd, marker) != NULL;
    int parent_forkserver = parent != NULL && parent->forkserver;
    if (in_forkserver && !parent_forkserver) {
        char parent_cmd[2048];
        parent_forkserver = mt_os_proc_cmdline(ppid, parent_cmd, sizeof parent_cmd) > 0 &&
                            strstr(parent_cmd, marker) != NULL;
    }
    if (parent_forkserver) {
        return ROLE_WORKER;
    }
    if (in_forkserver) {
        *forkserver = 1;
        return ROLE_HELPER;
    }
    if (mt_os_proc_listens(pid, ppid) == 1) {
        return ROLE_HELPER; /* a server of its own: a multiprocessing Manager */
    }
    if (ppid == r->root_pid || (n > 0 && strstr(cmd, "--multiprocessing-fork") != NULL)) {
        return ROLE_WORKER;
    }
    return ROLE_OTHER;
}

/* The role a process wrote in its slot (table/layout.h numbers its roles
 * differently): a worker unless it said otherwise. */
static mt_role
declared_role(int role)
{
    switch (role) {
    case 1:
        return ROLE_TOOL;
    case 2:
        return ROLE_ROOT;
    case 3:
        return ROLE_HELPER;
    case 4:
        return ROLE_OTHER;
    default:
        return ROLE_WORKER;
    }
}

/* The role of a memtrack-aware process in a slot. */
static mt_role
classify_slot(RecorderObject *r, long pid)
{
    if (pid == r->root_pid) {
        return ROLE_ROOT; /* the command imports memtrack and joined the table */
    }
    char cmd[2048];
    if (mt_os_proc_cmdline(pid, cmd, sizeof cmd) > 0 && has_helper_command(cmd)) {
        return ROLE_HELPER;
    }
    long ppid = 0;
    return mt_os_proc_listens(pid, mt_os_proc_parent(pid, &ppid) == 0 ? ppid : 0) == 1
               ? ROLE_HELPER
               : ROLE_WORKER;
}

/* oom_kills(pid) for the Python layer (forensics.py): where the kernel counts
 * the OOM kills of pid's memory cgroup, and how many so far; None when not
 * readable. */
PyObject *
mt_oom_kills_py(PyObject *module, PyObject *arg)
{
    long pid = PyLong_AsLong(arg);
    if (pid == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (pid < 0) {
        PyErr_SetString(PyExc_ValueError, "pid must be >= 0 (0: this process)");
        return NULL;
    }
    char file[256];
    int64_t kills = -1;
    Py_BEGIN_ALLOW_THREADS
    if (mt_os_oom_counter_file(pid == 0 ? mt_os_pid() : pid, file, sizeof file) == 0) {
        kills = mt_os_oom_kills(file);
    }
    Py_END_ALLOW_THREADS
    if (kills < 0) {
        Py_RETURN_NONE;
    }
    return Py_BuildValue("(sL)", file, (long long)kills);
}

/* ------------------------------------------------------------------------ */
/* One round of sampling.                                                    */

typedef struct {
    uint32_t live;
    uint64_t rss, pss, peak;
    int estimated; /* some pss in the sum is an estimate */
    uint64_t root_rss, root_pss, others_rss, others_pss;
} mt_pool;

static void
add_to_pool(mt_pool *pool, mt_role role, uint64_t rss, uint64_t peak, int pss_state, uint64_t pss)
{
    uint64_t pss_or_rss = pss_state >= 0 ? pss : rss;
    switch (role) {
    case ROLE_WORKER:
        pool->live++;
        pool->rss += rss;
        pool->pss += pss_or_rss;
        pool->peak += peak > rss ? peak : rss;
        pool->estimated |= pss_state <= 0;
        break;
    case ROLE_ROOT:
        pool->root_rss += rss;
        pool->root_pss += pss_or_rss;
        break;
    case ROLE_HELPER:
    case ROLE_OTHER:
        pool->others_rss += rss;
        pool->others_pss += pss_or_rss;
        break;
    case ROLE_TOOL:
        break;
    }
}

static int
sample_self(RecorderObject *r, double now, mt_pool *pool)
{
    uint64_t peak = 0, rss = 0, lost = 0, pss = 0, uss = 0;
    char phase[256];
    mt_oserr e;
    mtx_lock(&mt_phase_lock);
    int rc = mt_peak_take_window_locked(&peak, &lost, &rss, &e);
    if (rc == 0) {
        mt_phase_fold_locked(lost); /* the open phases keep what the reset took */
    }
    mt_phase_current_locked(phase, sizeof phase);
    mtx_unlock(&mt_phase_lock);
    if (rc < 0) {
        return 0; /* a reading failed this round: no sample, no error */
    }
    uint64_t status_rss, hwm, anon = 0;
    if (mt_os_proc_memory(mt_os_pid(), &status_rss, &hwm, &anon) < 0) {
        anon = rss;
    }
    int pss_state =
        track_pss(&r->self_pss, 0, pss_gap(r), rss, anon, &pss, &uss);
    add_to_pool(pool, r->self_role, rss, peak, pss_state, pss);
    mtx_lock(&r->lock);
    r->self_rss = rss;
    mtx_unlock(&r->lock);
    return pack_sample(r->pk, now, mt_os_pid(), "self", r->self_role, rss, peak, pss_state, pss,
                       uss, phase);
}

/* Every task end in the slot's ring since the previous round, as a task
 * event (none is lost to the sampling interval); ends the ring overwrote
 * before this round are counted in a "dropped" event. */
static int
drain_ends(RecorderObject *r, mt_seen_slot *seen, const mt_worker_view *v)
{
    int rc = 0;
    if (v->ends_written <= seen->ends_read) {
        seen->ends_read = v->ends_written; /* a slot reused by the same pid starts again */
        return 0;
    }
    uint64_t fresh = v->ends_written - seen->ends_read;
    if (fresh > v->nends) {
        uint64_t lost = fresh - v->nends;
        seen->ends_dropped += lost;
        rc |= mt_pack_map(r->pk, 6);
        rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "event");
        rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, v->ends[0].time);
        rc |= mt_pack_key(r->pk, "kind") | mt_pack_key(r->pk, "dropped");
        rc |= mt_pack_key(r->pk, "pid") | mt_pack_i64(r->pk, (long)v->pid);
        rc |= mt_pack_key(r->pk, "slot") | mt_pack_u64(r->pk, v->slot);
        rc |= mt_pack_key(r->pk, "count") | mt_pack_u64(r->pk, lost);
        fresh = v->nends;
    }
    for (uint32_t k = v->nends - (uint32_t)fresh; k < v->nends; k++) {
        uint64_t number = v->ends_written - (v->nends - 1 - k); /* 1 for the first task */
        rc |= mt_pack_map(r->pk, 9);
        rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "event");
        rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, v->ends[k].time);
        rc |= mt_pack_key(r->pk, "kind") | mt_pack_key(r->pk, "task");
        rc |= mt_pack_key(r->pk, "pid") | mt_pack_i64(r->pk, (long)v->pid);
        rc |= mt_pack_key(r->pk, "slot") | mt_pack_u64(r->pk, v->slot);
        rc |= mt_pack_key(r->pk, "retained") | mt_pack_u64(r->pk, v->ends[k].retained);
        rc |= mt_pack_key(r->pk, "peak_rss") | mt_pack_u64(r->pk, v->ends[k].peak_rss);
        rc |= mt_pack_key(r->pk, "phase") | pack_str_or_nil(r->pk, v->ends[k].path);
        rc |= mt_pack_key(r->pk, "tasks") | mt_pack_u64(r->pk, number);
    }
    seen->ends_read = v->ends_written;
    return rc;
}

static int
sample_workers(RecorderObject *r, double now, mt_pool *pool)
{
    int rc = 0;
    mt_worker_view *v = &r->view;
    if (mt_reader_scan(r->table) < 0) {
        return 0; /* damaged: no worker samples, the pool record says none live */
    }
    for (uint32_t i = 0; i < r->capacity; i++) {
        mt_seen_slot *seen = &r->seen[i];
        int st = mt_reader_view(r->table, i, v);
        if (st != 0) {
            seen->pid = st == 1 ? 0 : seen->pid; /* freed or busy; corrupt: keep */
            continue;
        }
        uint64_t window = mt_reader_take_window(r->table, i);
        if (seen->pid != v->pid) { /* a new owner */
            memset(seen, 0, sizeof *seen);
            seen->pid = v->pid;
            seen->role = declared_role(v->role);
            if (seen->role == ROLE_WORKER) {
                seen->role = classify_slot(r, (long)v->pid);
            }
            seen->oom = oom_counter_of(r, (long)v->pid);
            rc |= pack_event(r->pk, v->joined, "join", v, (long)v->pid, seen->role, v->phase,
                             v->rss, v->peak_rss, 0);
            r->sharing_changes = 1;
        }
        else if (v->alive && seen->role == ROLE_WORKER && seen->rounds <= ROLE_RECHECK_ROUNDS &&
                 is_power_of_two(seen->rounds)) {
            seen->role = classify_slot(r, (long)v->pid);
        }
        seen->rounds++;
        if (v->alive) {
            /* The slot's rss is as fresh as the worker's last phase change or
             * heartbeat; /proc's is of now (when we may read it). */
            uint64_t rss = v->rss, hwm, anon = v->rss, pss = v->pss, uss = v->uss;
            if (mt_os_proc_memory((long)v->pid, &rss, &hwm, &anon) < 0) {
                rss = anon = v->rss;
            }
            int pss_state = track_pss(&seen->pss, (long)v->pid, pss_gap(r),
                                      rss, anon, &pss, &uss);
            if (pss_state == 1) { /* now and then: it may have moved to another cgroup */
                seen->oom = oom_counter_of(r, (long)v->pid);
            }
            if (pss_state < 0 && v->pss != 0) {
                pss_state = 0; /* the worker's own reading, of unknown age */
                pss = v->pss;
                uss = v->uss;
            }
            uint64_t peak = window > rss ? window : rss;
            rc |= pack_sample(r->pk, now, (long)v->pid, "worker", seen->role, rss, peak,
                              pss_state, pss, uss, v->phase);
            add_to_pool(pool, seen->role, rss, peak, pss_state, pss);
        }
        rc |= drain_ends(r, seen, v);
        if (strcmp(seen->phase, v->phase) != 0) {
            rc |= pack_event(r->pk, now, "phase", v, (long)v->pid, seen->role, v->phase, v->rss,
                             v->peak_rss, 0);
            memcpy(seen->phase, v->phase, sizeof seen->phase);
        }
        if (!v->alive && seen->state != v->state) {
            int killed = strcmp(v->state, "killed") == 0;
            if (killed && !v->has_exit_signal) {
                int code, sig;
                if (mt_os_proc_exit_status((long)v->pid, &code, &sig) && sig > 0) {
                    v->has_exit_signal = 1;
                    v->exit_signal = sig;
                }
            }
            int oom = killed && (!v->has_exit_signal || v->exit_signal == 9) &&
                      oom_killed(r, seen->oom);
            if (oom && !v->has_exit_signal) {
                v->has_exit_signal = 1;
                v->exit_signal = 9; /* the OOM killer sends SIGKILL */
            }
            rc |= pack_event(r->pk, now, killed ? "death" : "exit", v, (long)v->pid, seen->role,
                             v->phase, v->rss, v->peak_rss, oom);
            r->sharing_changes = 1;
        }
        seen->state = v->state;
    }
    return rc;
}

static int
is_worker(const RecorderObject *r, long pid)
{
    for (uint32_t i = 0; r->seen != NULL && i < r->capacity; i++) {
        if (r->seen[i].pid == pid) {
            return 1;
        }
    }
    return 0;
}

static mt_seen_proc *
find_proc(RecorderObject *r, long pid)
{
    mt_seen_proc *p = known_proc(r, pid);
    if (p != NULL || r->nprocs == MAX_PROCS) {
        return p;
    }
    p = &r->procs[r->nprocs++];
    memset(p, 0, sizeof *p);
    p->pid = pid;
    return p;
}

/* The final record of a descendant seen through /proc (a slot's comes from
 * the table, recording.py): like a worker record, without phases or tasks. */
static int
pack_proc_record(mt_packer *pk, const mt_seen_proc *p, const char *state, int oom)
{
    int rc = mt_pack_map(pk, 17);
    rc |= mt_pack_key(pk, "t") | mt_pack_key(pk, "worker");
    rc |= mt_pack_key(pk, "source") | mt_pack_key(pk, "proc");
    rc |= mt_pack_key(pk, "pid") | mt_pack_i64(pk, p->pid);
    rc |= mt_pack_key(pk, "ppid") | mt_pack_i64(pk, p->ppid);
    rc |= mt_pack_key(pk, "role") | mt_pack_key(pk, role_names[p->role]);
    rc |= mt_pack_key(pk, "state") | mt_pack_key(pk, state);
    rc |= mt_pack_key(pk, "tasks") | mt_pack_nil(pk);
    rc |= mt_pack_key(pk, "rss") | mt_pack_u64(pk, p->rss);
    rc |= mt_pack_key(pk, "peak_rss") | mt_pack_u64(pk, p->max_hwm > p->rss ? p->max_hwm : p->rss);
    rc |= mt_pack_key(pk, "pss") | (p->have_pss ? mt_pack_u64(pk, p->pss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "uss") | (p->have_pss ? mt_pack_u64(pk, p->uss) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "exit_code") |
          (p->has_exit && p->exit_code >= 0 ? mt_pack_i64(pk, p->exit_code) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "exit_signal") |
          (p->has_exit && p->exit_signal > 0 ? mt_pack_i64(pk, p->exit_signal) : mt_pack_nil(pk));
    rc |= mt_pack_key(pk, "oom") | mt_pack_bool(pk, oom);
    rc |= mt_pack_key(pk, "joined") | mt_pack_double(pk, p->joined);
    rc |= mt_pack_key(pk, "updated") | mt_pack_double(pk, p->updated);
    rc |= mt_pack_key(pk, "phases") | mt_pack_map(pk, 0);
    return rc;
}

/* A descendant left: how (its zombie's status if we caught it, the OOM
 * killer if its counter rose), as an event and its final record. */
static int
proc_left(RecorderObject *r, mt_seen_proc *p, double now)
{
    int oom = (!p->has_exit || p->exit_signal == 9) && oom_killed(r, p->oom);
    if (oom) {
        p->has_exit = 1;
        p->exit_code = -1;
        p->exit_signal = 9;
    }
    int died = p->has_exit && p->exit_signal > 0;
    const char *state = died ? "killed" : "exited";
    int rc = mt_pack_map(r->pk, 13);
    rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "event");
    rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, now);
    rc |= mt_pack_key(r->pk, "kind") | mt_pack_key(r->pk, died ? "death" : "exit");
    rc |= mt_pack_key(r->pk, "pid") | mt_pack_i64(r->pk, p->pid);
    rc |= mt_pack_key(r->pk, "role") | mt_pack_key(r->pk, role_names[p->role]);
    rc |= mt_pack_key(r->pk, "slot") | mt_pack_nil(r->pk);
    rc |= mt_pack_key(r->pk, "phase") | mt_pack_nil(r->pk);
    rc |= mt_pack_key(r->pk, "rss") | mt_pack_u64(r->pk, p->rss);
    rc |= mt_pack_key(r->pk, "peak_rss") | mt_pack_u64(r->pk, p->max_hwm);
    rc |= mt_pack_key(r->pk, "exit_code") |
          (p->has_exit && p->exit_code >= 0 ? mt_pack_i64(r->pk, p->exit_code) : mt_pack_nil(r->pk));
    rc |= mt_pack_key(r->pk, "exit_signal") |
          (died ? mt_pack_i64(r->pk, p->exit_signal) : mt_pack_nil(r->pk));
    rc |= mt_pack_key(r->pk, "state") | mt_pack_key(r->pk, state);
    rc |= mt_pack_key(r->pk, "oom") | mt_pack_bool(r->pk, oom);
    rc |= pack_proc_record(r->pk, p, state, oom);
    return rc;
}

/* Every descendant of root_pid (and root itself) that is not in a slot. */
static int
sample_tree(RecorderObject *r, double now, mt_pool *pool)
{
    int rc = 0;
    size_t n = 0;
    r->tree[n] = r->root_pid;
    r->tree_parent[n++] = 0;
    for (size_t i = 0; i < n; i++) {
        size_t before = n;
        mt_os_children(r->tree[i], r->tree, &n, MAX_PROCS);
        for (size_t j = before; j < n; j++) {
            r->tree_parent[j] = r->tree[i];
        }
    }
    for (size_t i = 0; i < r->nprocs; i++) {
        r->procs[i].present = 0;
    }
    for (size_t i = 0; i < n; i++) {
        long pid = r->tree[i];
        uint64_t rss, hwm, anon;
        if (is_worker(r, pid)) {
            continue;
        }
        mt_seen_proc *p = known_proc(r, pid);
        if (mt_os_proc_memory(pid, &rss, &hwm, &anon) < 0) {
            int code, sig;
            if (p != NULL && !p->has_exit && mt_os_proc_exit_status(pid, &code, &sig)) {
                p->has_exit = 1; /* a zombie: it is gone, and we know how */
                p->exit_code = code;
                p->exit_signal = sig;
            }
            continue;
        }
        p = p != NULL ? p : find_proc(r, pid);
        if (p == NULL) {
            continue;
        }
        if (p->rounds == 0) {
            p->ppid = r->tree_parent[i];
            p->role = classify_proc(r, pid, p->ppid, &p->forkserver);
            p->oom = oom_counter_of(r, pid);
            p->joined = now;
            rc |= pack_event(r->pk, now, "join", NULL, pid, p->role, NULL, rss, hwm, 0);
            r->sharing_changes = 1;
        }
        else if ((p->role == ROLE_WORKER || p->role == ROLE_OTHER) &&
                 p->rounds <= ROLE_RECHECK_ROUNDS && is_power_of_two(p->rounds)) {
            /* A process first seen between its fork and its exec (the resource
             * tracker, the forkserver) shows what it is now. */
            int fs;
            mt_role role = classify_proc(r, pid, p->ppid, &fs);
            if (role == ROLE_HELPER) { /* only ever to a helper */
                p->role = role;
                p->forkserver = fs;
            }
        }
        p->rounds++;
        p->present = 1;
        p->rss = rss;
        p->updated = now;
        if (hwm > p->max_hwm) {
            p->max_hwm = hwm;
        }
        uint64_t pss = 0, uss = 0;
        int pss_state =
            track_pss(&p->track, pid, pss_gap(r), rss, anon, &pss, &uss);
        if (pss_state >= 0) {
            p->pss = pss;
            p->uss = uss;
            p->have_pss = 1;
        }
        if (pss_state == 1) { /* now and then: it may have moved to another cgroup */
            p->oom = oom_counter_of(r, pid);
        }
        const char *source = pid == r->root_pid ? "root" : "proc";
        /* Another process's high-water mark is its lifetime peak, not this
         * round's: the pool sums this round's rss. */
        rc |= pack_sample(r->pk, now, pid, source, p->role, rss, hwm, pss_state, pss, uss, NULL);
        add_to_pool(pool, p->role, rss, rss, pss_state, pss);
    }
    /* The ones that left since the previous round; one that joined the table
     * since is followed through its slot from now on. */
    for (size_t i = 0; i < r->nprocs;) {
        if (!r->procs[i].present) {
            if (!is_worker(r, r->procs[i].pid)) {
                rc |= proc_left(r, &r->procs[i], now);
                r->sharing_changes = 1;
            }
            r->procs[i] = r->procs[--r->nprocs];
        }
        else {
            i++;
        }
    }
    return rc;
}

/* At the end: the final record of every descendant still running. */
static int
pack_live_procs(RecorderObject *r)
{
    int rc = 0;
    for (size_t i = 0; i < r->nprocs; i++) {
        rc |= pack_proc_record(r->pk, &r->procs[i], "running", 0);
    }
    return rc;
}

static void
flush(RecorderObject *r, int force)
{
    double now = mt_os_monotonic();
    if (r->pk == NULL) {
        return;
    }
    size_t size = mt_packer_size(r->pk);
    if (size == 0 || (!force && size < FLUSH_BYTES && now - r->last_flush < FLUSH_SECONDS)) {
        return;
    }
    mt_oserr e;
    int rc = mt_os_write_all(r->fd, mt_packer_data(r->pk), size, &e);
    mt_packer_clear(r->pk);
    r->last_flush = now;
    mtx_lock(&r->lock);
    if (rc < 0 && !r->failed) {
        r->failed = 1;
        r->write_error = e;
    }
    else if (rc == 0) {
        r->bytes += size;
    }
    mtx_unlock(&r->lock);
}

static void
sample_round(RecorderObject *r, int last)
{
    double now = mt_os_monotonic();
    mt_pool pool = {0};
    r->sharing_changed = r->sharing_changes;
    r->sharing_changes = 0;
    int rc = sample_self(r, now, &pool);
    if (r->table != NULL) {
        rc |= sample_workers(r, now, &pool);
    }
    if (r->root_pid > 0) {
        rc |= sample_tree(r, now, &pool);
        if (last) {
            rc |= pack_live_procs(r);
        }
    }
    if (r->table != NULL || r->root_pid > 0) {
        rc |= mt_pack_map(r->pk, 11);
        rc |= mt_pack_key(r->pk, "t") | mt_pack_key(r->pk, "pool");
        rc |= mt_pack_key(r->pk, "time") | mt_pack_double(r->pk, now);
        rc |= mt_pack_key(r->pk, "live") | mt_pack_u64(r->pk, pool.live);
        rc |= mt_pack_key(r->pk, "rss") | mt_pack_u64(r->pk, pool.rss);
        rc |= mt_pack_key(r->pk, "pss") | mt_pack_u64(r->pk, pool.pss);
        rc |= mt_pack_key(r->pk, "pss_estimated") | mt_pack_bool(r->pk, pool.estimated);
        rc |= mt_pack_key(r->pk, "peak_rss") | mt_pack_u64(r->pk, pool.peak);
        rc |= mt_pack_key(r->pk, "root_rss") | mt_pack_u64(r->pk, pool.root_rss);
        rc |= mt_pack_key(r->pk, "root_pss") | mt_pack_u64(r->pk, pool.root_pss);
        rc |= mt_pack_key(r->pk, "others_rss") | mt_pack_u64(r->pk, pool.others_rss);
        rc |= mt_pack_key(r->pk, "others_pss") | mt_pack_u64(r->pk, pool.others_pss);
    }
    r->beat++;
    mtx_lock(&r->lock);
    r->samples++;
    r->live = pool.live;
    r->pool_rss = pool.rss;
    r->pool_pss = pool.pss;
    r->pool_peak = pool.peak;
    r->root_pss = pool.root_pss;
    if (pool.pss > r->max_pool_pss) {
        r->max_pool_pss = pool.pss;
    }
    if (pool.peak > r->max_pool_peak) {
        r->max_pool_peak = pool.peak;
    }
    if (pool.root_pss > r->max_root_pss) {
        r->max_root_pss = pool.root_pss;
    }
    if (rc != 0 && !r->failed) {
        r->failed = 1;
        mt_fail(&r->write_error, "malloc", NULL, ENOMEM);
    }
    mtx_unlock(&r->lock);
    flush(r, 0);
}

static int
recorder_main(void *arg)
{
    RecorderObject *r = arg;
    mtx_lock(&r->lock);
    while (!r->stop) {
        mtx_unlock(&r->lock);
        sample_round(r, 0);
        mtx_lock(&r->lock);
        if (r->stop) {
            break;
        }
        struct timespec until;
        timespec_get(&until, TIME_UTC);
        double whole = (double)(time_t)r->interval;
        until.tv_sec += (time_t)r->interval;
        until.tv_nsec += (long)((r->interval - whole) * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        cnd_timedwait(&r->wake, &r->lock, &until);
    }
    mtx_unlock(&r->lock);
    sample_round(r, 1); /* the state at the end */
    flush(r, 1);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The Python type                                                           */

static void
free_buffers(RecorderObject *r)
{
    PyMem_RawFree(r->seen);
    PyMem_RawFree(r->procs);
    PyMem_RawFree(r->tree);
    PyMem_RawFree(r->tree_parent);
    r->tree_parent = NULL;
    r->seen = NULL;
    r->procs = NULL;
    r->tree = NULL;
    mt_packer_free(r->pk);
    r->pk = NULL;
    mt_reader_close(r->table);
    r->table = NULL;
}

static int
recorder_init(RecorderObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd",        "interval",  "table", "root_pid",
                             "pss_every", "self_role", NULL};
    int fd;
    double interval;
    const char *table = NULL;
    long root_pid = 0;
    int pss_every = 10;
    const char *self_role = "root";
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "id|zlis:Recorder", kwlist, &fd, &interval,
                                     &table, &root_pid, &pss_every, &self_role)) {
        return -1;
    }
    if (strcmp(self_role, "root") != 0 && strcmp(self_role, "tool") != 0) {
        PyErr_Format(PyExc_ValueError, "self_role must be 'root' or 'tool', not '%s'", self_role);
        return -1;
    }
    if (self->running || self->pk != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder is already initialised");
        return -1;
    }
    if (!(interval >= MT_MIN_INTERVAL && interval <= MT_MAX_INTERVAL)) {
        PyObject *given = PyFloat_FromDouble(interval); /* PyErr_Format has no %g */
        if (given != NULL) {
            PyErr_Format(PyExc_ValueError, "interval must be between 0.001 and 3600 s, not %R",
                         given);
            Py_DECREF(given);
        }
        return -1;
    }
    if (pss_every < 1 || fd < 0 || root_pid < 0) {
        PyErr_SetString(PyExc_ValueError, "pss_every must be >= 1, fd and root_pid >= 0");
        return -1;
    }
    self->fd = fd;
    self->interval = interval;
    self->pss_every = pss_every;
    self->root_pid = root_pid;
    self->self_role = strcmp(self_role, "tool") == 0 ? ROLE_TOOL : ROLE_ROOT;
    self->noom = 0;
    if (mtx_init(&self->lock, mtx_plain) != thrd_success || cnd_init(&self->wake) != thrd_success) {
        PyErr_NoMemory();
        return -1;
    }
    self->pk = mt_packer_new();
    self->procs = PyMem_RawCalloc(MAX_PROCS, sizeof *self->procs);
    self->tree = PyMem_RawCalloc(MAX_PROCS, sizeof *self->tree);
    self->tree_parent = PyMem_RawCalloc(MAX_PROCS, sizeof *self->tree_parent);
    if (self->pk == NULL || self->procs == NULL || self->tree == NULL ||
        self->tree_parent == NULL) {
        free_buffers(self);
        PyErr_NoMemory();
        return -1;
    }
    if (table != NULL) {
        const char *why;
        mt_oserr e;
        self->table = mt_reader_open(table, &why, &e);
        if (self->table == NULL) {
            free_buffers(self);
            if (why != NULL) {
                mt_state *st = mt_state_from_type(Py_TYPE(self));
                if (st != NULL) {
                    PyErr_Format(st->TableError, "cannot record worker table %s: %s", table, why);
                }
            }
            else {
                mt_raise_oserr(&e);
            }
            return -1;
        }
        self->capacity = mt_reader_capacity(self->table);
        self->seen = PyMem_RawCalloc(self->capacity, sizeof *self->seen);
        if (self->seen == NULL) {
            free_buffers(self);
            PyErr_NoMemory();
            return -1;
        }
    }
    return 0;
}

static PyObject *
recorder_start(RecorderObject *self, PyObject *unused)
{
    if (self->pk == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder was not initialised or has stopped");
        return NULL;
    }
    if (self->running) {
        PyErr_SetString(PyExc_RuntimeError, "Recorder is already running");
        return NULL;
    }
    self->stop = 0;
    self->last_flush = mt_os_monotonic();
    if (thrd_create(&self->thread, recorder_main, self) != thrd_success) {
        PyErr_SetString(PyExc_OSError, "cannot start the recorder thread");
        return NULL;
    }
    self->running = 1;
    self->owner_pid = mt_os_pid();
    Py_INCREF(self); /* the thread uses it until stop() joins */
    Py_RETURN_NONE;
}

static void
stop_thread(RecorderObject *self)
{
    if (!self->running) {
        return;
    }
    if (self->owner_pid != mt_os_pid()) {
        self->running = 0; /* a forked child: the thread is the parent's */
        return;
    }
    mtx_lock(&self->lock);
    self->stop = 1;
    cnd_signal(&self->wake);
    mtx_unlock(&self->lock);
    Py_BEGIN_ALLOW_THREADS thrd_join(self->thread, NULL);
    Py_END_ALLOW_THREADS self->running = 0;
}

/* stop() -> status dict; raises the first write error, after stopping. */
static PyObject *recorder_status(RecorderObject *self, PyObject *unused);

/* {pid: role} of the slots' owners as the thread last decided: the final
 * worker records (recording.py) carry it. */
static PyObject *
slot_roles(RecorderObject *self)
{
    PyObject *roles = PyDict_New();
    for (uint32_t i = 0; roles != NULL && self->seen != NULL && i < self->capacity; i++) {
        if (self->seen[i].pid == 0) {
            continue;
        }
        PyObject *pid = PyLong_FromLongLong(self->seen[i].pid);
        PyObject *role = PyUnicode_FromString(role_names[self->seen[i].role]);
        if (pid == NULL || role == NULL || PyDict_SetItem(roles, pid, role) < 0) {
            Py_CLEAR(roles);
        }
        Py_XDECREF(pid);
        Py_XDECREF(role);
    }
    return roles;
}

static PyObject *
recorder_stop(RecorderObject *self, PyObject *unused)
{
    int was_running = self->running;
    stop_thread(self);
    PyObject *status = recorder_status(self, NULL);
    PyObject *roles = status != NULL ? slot_roles(self) : NULL;
    if (roles != NULL && PyDict_SetItemString(status, "roles", roles) < 0) {
        Py_CLEAR(status);
    }
    Py_XDECREF(roles);
    if (roles == NULL) {
        Py_CLEAR(status);
    }
    free_buffers(self);
    if (was_running) {
        Py_DECREF(self); /* the thread's reference; the caller still holds one */
    }
    if (status != NULL && self->failed) {
        Py_DECREF(status);
        mt_raise_oserr(&self->write_error);
        return NULL;
    }
    return status;
}

static PyObject *
recorder_status(RecorderObject *self, PyObject *unused)
{
    mtx_lock(&self->lock);
    unsigned long long samples = self->samples, bytes = self->bytes, rss = self->pool_rss,
                       pss = self->pool_pss, peak = self->pool_peak, max_pss = self->max_pool_pss,
                       max_peak = self->max_pool_peak, self_rss = self->self_rss,
                       root_pss = self->root_pss, max_root_pss = self->max_root_pss;
    unsigned live = self->live;
    int failed = self->failed;
    mtx_unlock(&self->lock);
    return Py_BuildValue("{s:K,s:K,s:I,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:K,s:O,s:O}", "samples",
                         samples, "bytes", bytes, "live", live, "pool_rss", rss, "pool_pss", pss,
                         "pool_peak", peak, "max_pool_pss", max_pss, "max_pool_peak", max_peak,
                         "self_rss", self_rss, "root_pss", root_pss, "max_root_pss",
                         max_root_pss, "failed", failed ? Py_True : Py_False, "running",
                         self->running ? Py_True : Py_False);
}

static void
recorder_dealloc(RecorderObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    /* The running thread holds a reference, so a running recorder is never
     * deallocated; only the buffers of a stopped one remain. */
    free_buffers(self);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyMethodDef recorder_methods[] = {
    {"start", (PyCFunction)recorder_start, METH_NOARGS, "Start the sampling thread."},
    {"stop", (PyCFunction)recorder_stop, METH_NOARGS,
     "Stop, write what is buffered, and return the status."},
    {"status", (PyCFunction)recorder_status, METH_NOARGS, "The latest pool figures."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot recorder_slots[] = {
    {Py_tp_doc, "Recorder(fd, interval, table=None, root_pid=0, pss_every=10, self_role='root')"},
    {Py_tp_init, recorder_init},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_dealloc, recorder_dealloc},
    {Py_tp_methods, recorder_methods},
    {0, NULL},
};

PyType_Spec mt_recorder_spec = {
    .name = "memtrack._core.Recorder",
    .basicsize = sizeof(RecorderObject),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = recorder_slots,
};
