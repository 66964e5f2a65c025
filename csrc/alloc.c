/*
 * Allocation attribution: which code allocates the memory, per thread, per
 * phase and per call site (docs/allocations.md).
 *
 * The hooks wrap CPython's three allocator domains (PEP 445: RAW, MEM, OBJ)
 * and, on request, numpy's array-data allocator (NEP 49). Each wrapper calls
 * the allocator it replaced and then accounts the block:
 *
 *  - exact counters: bytes and number of allocations of the calling thread,
 *    kept in thread-local storage (no lock, no atomic read-modify-write per
 *    allocation). A phase reads its thread's counters at enter and at exit.
 *  - sampling by bytes: each thread counts down an exponentially distributed
 *    number of bytes (a Poisson process over the allocated bytes, mean
 *    `interval`); the allocation in which the countdown runs out is sampled:
 *    its Python stack (code objects and line numbers), the phase path open in
 *    the thread, and its weight n / (1 - exp(-n / interval)), which makes the
 *    summed weights an unbiased estimate of the bytes allocated at each site.
 *  - retention: sampled blocks go into a pointer set; a free of one takes its
 *    weight off its site's live bytes, so what is left is "retained by site".
 *
 * The RAW domain is called without the GIL, so everything a hook touches is
 * either the calling thread's own (thread-local), atomic, or Protected by
 * sample_lock (taken only when a sample is taken or a sampled block freed).
 * A thread-local guard turns the hooks into plain pass-through while memtrack
 * itself allocates during a sample (reading frames may create frame objects).
 */
#include "memtrack.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SITE_CAP 4096u           /* distinct (phase path, stack) sites */
#define SITE_INDEX (SITE_CAP * 2) /* open addressing over site ids */
#define LIVE_CAP (1u << 16)      /* pointer set slots (keys) */
#define LIVE_MAX (LIVE_CAP / 4)  /* live sampled blocks tracked at most */
#define FILTER_WORDS 1024u       /* 65536-bit filter in front of the set */
#define FILTER_REBUILD 2048u     /* insertions between rebuilds: the filter stays ~3% set */
#define KEY_EMPTY ((uintptr_t)0)
#define KEY_GONE ((uintptr_t)1)
#define SITE_OTHER 0u /* site 0: samples that found the site table full */

enum { DOMAIN_RAW, DOMAIN_MEM, DOMAIN_OBJ, NDOMAINS };

typedef struct {
    PyObject *code; /* strong reference while the site exists */
    int line;
} mt_site_frame;

typedef struct {
    uint64_t hash;
    uint32_t path_id;
    uint32_t nframes;
    mt_site_frame *frames; /* into sites.frames, max_frames per site */
    uint64_t samples;
    double bytes;  /* estimated bytes allocated here */
    double count;  /* estimated allocations */
    double live;   /* estimated bytes of sampled blocks not yet freed */
    uint64_t live_samples;
} mt_site;

typedef struct {
    _Atomic uintptr_t keys[LIVE_CAP];
    _Atomic uint64_t filter[FILTER_WORDS];
    uint32_t site[LIVE_CAP]; /* read and written under sample_lock */
    double weight[LIVE_CAP];
    uint32_t used, gone, inserted; /* under sample_lock */
} mt_live_table;

/* The hooks' settings and state. Atomic fields are read by hooks in any
 * thread; the rest is Protected by sample_lock unless noted. */
static struct {
    atomic_bool active;         /* hooks account (else they only forward) */
    atomic_int_least64_t mean;  /* sampling interval, bytes */
    atomic_uint gen;            /* bumped by every start(): threads re-draw */
    atomic_uint_least64_t seed; /* for the per-thread generators */
    int max_frames;             /* frames kept per sample (set while stopped) */
    int installed;              /* PEP 445 hooks in place: GIL */
    int small_hooks;            /* MEM/OBJ hooks leave large blocks to RAW: GIL */
    PyMemAllocatorEx prev[NDOMAINS]; /* what the hooks forward to: GIL */
    mt_site *sites;
    mt_site_frame *frames;
    uint32_t nsites;
    uint32_t *index; /* site id + 1, or 0 */
    uint64_t samples, dropped_frames, untracked;
    mt_live_table *tables[2];
    _Atomic(mt_live_table *) live; /* the table in use */
    atomic_uint live_gen;          /* odd while the table is being rebuilt */
    atomic_uint_least64_t live_count;
} al = {.mean = 512 * 1024, .max_frames = 16};

mtx_t mt_alloc_sample_lock;
/* Every thread that has allocated since the hooks went in, for totals.
 * Protected by threads_lock; the counters in each entry are atomics that
 * only their own thread writes. */
static mtx_t threads_lock;
static mt_alloc_thread threads_head;
static uint64_t retired_bytes, retired_count; /* threads that ended */
static tss_t thread_key;
static uint64_t thread_ordinal;

MT_TLS_FAST _Thread_local mt_alloc_thread mt_alloc_tls;
atomic_uint mt_alloc_session; /* 0: off; else the number of the current start() */

/* ------------------------------------------------------------------------ */
/* Threads                                                                   */

static void
thread_ended(void *arg)
{
    mt_alloc_thread *t = arg; /* this is the ending thread's own */
    uint64_t bytes, count;
    mt_alloc_thread_counts(&bytes, &count);
    mtx_lock(&threads_lock);
    retired_bytes += bytes;
    retired_count += count;
    t->prev->next = t->next;
    t->next->prev = t->prev;
    t->prev = t->next = NULL;
    t->state = MT_ALLOC_THREAD_ENDED;
    t->guard = 1; /* later allocations in this thread pass through, never re-register */
    mtx_unlock(&threads_lock);
}

static uint64_t
splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* An exponentially distributed number of bytes with the configured mean. */
static int64_t
draw_interval(mt_alloc_thread *t)
{
    double u = ((double)(splitmix(&t->rng) >> 11) + 1.0) * 0x1.0p-53; /* (0, 1] */
    double bytes = -log(u) * (double)atomic_load_explicit(&al.mean, memory_order_relaxed);
    return bytes >= 9.0e18 ? INT64_MAX : (int64_t)bytes + 1;
}

/* A new countdown: the bytes of the old one move to bytes_base, and the
 * thread's exact figures are published for counters(). */
static void
redraw(mt_alloc_thread *t)
{
    t->bytes_base += (uint64_t)(t->drawn - t->countdown);
    t->countdown = t->drawn = draw_interval(t);
    atomic_store_explicit(&t->pub_bytes, t->bytes_base, memory_order_relaxed);
    atomic_store_explicit(&t->pub_count, t->count, memory_order_relaxed);
}

static void
seed_thread(mt_alloc_thread *t, uint64_t ordinal)
{
    t->rng = atomic_load_explicit(&al.seed, memory_order_relaxed) ^ (ordinal * 0xD1B54A32D192ED03ull);
    t->gen = atomic_load_explicit(&al.gen, memory_order_relaxed);
    redraw(t);
}

static void
register_thread(mt_alloc_thread *t)
{
    mtx_lock(&threads_lock);
    t->next = &threads_head;
    t->prev = threads_head.prev;
    threads_head.prev->next = t;
    threads_head.prev = t;
    t->ordinal = thread_ordinal++;
    t->ident = PyThread_get_thread_ident();
    t->state = MT_ALLOC_THREAD_LISTED;
    mtx_unlock(&threads_lock);
    tss_set(thread_key, t); /* thread_ended() runs when the thread ends */
}

/* ------------------------------------------------------------------------ */
/* The pointer set of live sampled blocks                                    */

static inline uint64_t
ptr_hash(uintptr_t p)
{
    return (uint64_t)(p >> 4) * 0x9E3779B97F4A7C15ull;
}

static inline uint32_t
slot_of(uint64_t h)
{
    return (uint32_t)(h >> 48) & (LIVE_CAP - 1);
}

static inline int
filter_has(mt_live_table *t, uint64_t h)
{
    uint32_t bit = (uint32_t)(h >> 32) & (FILTER_WORDS * 64 - 1);
    uint64_t w = atomic_load_explicit(&t->filter[bit / 64], memory_order_relaxed);
    return (w >> (bit % 64)) & 1;
}

static inline void
filter_add(mt_live_table *t, uint64_t h)
{
    uint32_t bit = (uint32_t)(h >> 32) & (FILTER_WORDS * 64 - 1);
    atomic_fetch_or_explicit(&t->filter[bit / 64], 1ull << (bit % 64), memory_order_relaxed);
}

/* Index of p's key, or -1. sample_lock held (or a seqlock read, see forget). */
static int64_t
live_find(mt_live_table *t, uintptr_t p, uint64_t h)
{
    for (uint32_t i = slot_of(h), n = 0; n < LIVE_CAP; i = (i + 1) & (LIVE_CAP - 1), n++) {
        uintptr_t k = atomic_load_explicit(&t->keys[i], memory_order_relaxed);
        if (k == p) {
            return i;
        }
        if (k == KEY_EMPTY) {
            return -1;
        }
    }
    return -1;
}

static void
live_put_locked(mt_live_table *t, uintptr_t p, uint32_t site, double weight)
{
    uint64_t h = ptr_hash(p);
    for (uint32_t i = slot_of(h);; i = (i + 1) & (LIVE_CAP - 1)) {
        uintptr_t k = atomic_load_explicit(&t->keys[i], memory_order_relaxed);
        if (k == KEY_EMPTY || k == KEY_GONE) {
            t->site[i] = site;
            t->weight[i] = weight;
            t->used++;
            t->gone -= k == KEY_GONE;
            t->inserted++;
            filter_add(t, h);
            atomic_store_explicit(&t->keys[i], p, memory_order_release);
            return;
        }
    }
}

static void
live_clear_locked(mt_live_table *t)
{
    for (uint32_t i = 0; i < LIVE_CAP; i++) {
        atomic_store_explicit(&t->keys[i], KEY_EMPTY, memory_order_relaxed);
    }
    for (uint32_t i = 0; i < FILTER_WORDS; i++) {
        atomic_store_explicit(&t->filter[i], 0, memory_order_relaxed);
    }
    t->used = t->gone = t->inserted = 0;
}

/* Copy the live keys into the other table (no tombstones, a fresh filter)
 * and switch. Lock-free readers see live_gen change and retry locked. */
static void
live_rebuild_locked(void)
{
    mt_live_table *from = atomic_load_explicit(&al.live, memory_order_relaxed);
    mt_live_table *to = from == al.tables[0] ? al.tables[1] : al.tables[0];
    atomic_fetch_add_explicit(&al.live_gen, 1, memory_order_relaxed); /* odd */
    atomic_thread_fence(memory_order_release);
    live_clear_locked(to);
    for (uint32_t i = 0; i < LIVE_CAP; i++) {
        uintptr_t k = atomic_load_explicit(&from->keys[i], memory_order_relaxed);
        if (k != KEY_EMPTY && k != KEY_GONE) {
            live_put_locked(to, k, from->site[i], from->weight[i]);
        }
    }
    to->inserted = 0;
    atomic_store_explicit(&al.live, to, memory_order_release);
    atomic_fetch_add_explicit(&al.live_gen, 1, memory_order_release); /* even */
}

static void
forget_locked(uintptr_t p)
{
    mt_live_table *t = atomic_load_explicit(&al.live, memory_order_relaxed);
    int64_t i = live_find(t, p, ptr_hash(p));
    if (i < 0) {
        return;
    }
    mt_site *s = &al.sites[t->site[i]];
    s->live -= t->weight[i];
    s->live_samples--;
    if (s->live_samples == 0) {
        s->live = 0; /* no rounding residue on an empty site */
    }
    atomic_store_explicit(&t->keys[i], KEY_GONE, memory_order_relaxed);
    t->used--;
    t->gone++;
    atomic_fetch_sub_explicit(&al.live_count, 1, memory_order_relaxed);
}

/* Called before every free: is p a sampled block? The common answer, no, is
 * found without a lock: the filter (8 KiB) says no for most pointers; else
 * the set is probed under a sequence count, and only a hit or a concurrent
 * rebuild takes sample_lock. */
static void __attribute__((noinline))
forget_maybe(uintptr_t p, uint64_t h)
{
    unsigned g = atomic_load_explicit(&al.live_gen, memory_order_acquire);
    if ((g & 1) == 0) {
        mt_live_table *t = atomic_load_explicit(&al.live, memory_order_acquire);
        int64_t found = live_find(t, p, h);
        atomic_thread_fence(memory_order_acquire);
        if (found < 0 && atomic_load_explicit(&al.live_gen, memory_order_relaxed) == g) {
            return;
        }
    }
    mtx_lock(&mt_alloc_sample_lock);
    forget_locked(p);
    mtx_unlock(&mt_alloc_sample_lock);
}

/* Inlined in every free: may ptr be a sampled block? Most pointers leave at
 * the filter, with no lock and no write. */
static inline int
maybe_sampled(void *ptr)
{
    if (atomic_load_explicit(&al.live_count, memory_order_relaxed) == 0) {
        return 0;
    }
    uint64_t h = ptr_hash((uintptr_t)ptr);
    unsigned g = atomic_load_explicit(&al.live_gen, memory_order_acquire);
    mt_live_table *t = atomic_load_explicit(&al.live, memory_order_acquire);
    if ((g & 1) == 0 && !filter_has(t, h)) {
        atomic_thread_fence(memory_order_acquire);
        if (atomic_load_explicit(&al.live_gen, memory_order_relaxed) == g) {
            return 0; /* not sampled (the table did not change under us) */
        }
    }
    return ptr != NULL;
}

static inline void
forget(void *ptr)
{
    if (maybe_sampled(ptr)) {
        forget_maybe((uintptr_t)ptr, ptr_hash((uintptr_t)ptr));
    }
}

/* A free of a block that may be sampled: out of line, so that the common
 * free is a check and a tail call. */
static void __attribute__((noinline))
free_sampled(PyMemAllocatorEx *prev, void *ptr)
{
    forget_maybe((uintptr_t)ptr, ptr_hash((uintptr_t)ptr));
    prev->free(prev->ctx, ptr);
}

/* ------------------------------------------------------------------------ */
/* Sites                                                                     */

static uint64_t
site_hash(uint32_t path_id, const mt_site_frame *f, uint32_t n)
{
    uint64_t h = 1469598103934665603ull ^ path_id;
    for (uint32_t i = 0; i < n; i++) {
        h = (h ^ (uint64_t)(uintptr_t)f[i].code) * 1099511628211ull;
        h = (h ^ (uint64_t)(uint32_t)f[i].line) * 1099511628211ull;
    }
    return h ? h : 1;
}

static int
same_stack(const mt_site_frame *a, const mt_site_frame *b, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        if (a[i].code != b[i].code || a[i].line != b[i].line) {
            return 0;
        }
    }
    return 1;
}

/* The site of this stack in this phase, added when new (its code objects
 * get a reference: the caller holds the GIL whenever n > 0). */
static uint32_t
site_find_locked(uint32_t path_id, const mt_site_frame *f, uint32_t n)
{
    uint64_t h = site_hash(path_id, f, n);
    uint32_t i = (uint32_t)h & (SITE_INDEX - 1);
    for (;; i = (i + 1) & (SITE_INDEX - 1)) {
        uint32_t id = al.index[i];
        if (id == 0) {
            break;
        }
        mt_site *s = &al.sites[id - 1];
        if (s->hash == h && s->path_id == path_id && s->nframes == n && same_stack(s->frames, f, n)) {
            return id - 1;
        }
    }
    if (al.nsites >= SITE_CAP) {
        return SITE_OTHER;
    }
    uint32_t id = al.nsites++;
    mt_site *s = &al.sites[id];
    *s = (mt_site){.hash = h, .path_id = path_id, .nframes = n,
                   .frames = &al.frames[(size_t)id * MT_ALLOC_MAX_FRAMES]};
    for (uint32_t j = 0; j < n; j++) {
        s->frames[j] = f[j];
        Py_INCREF(f[j].code);
    }
    al.index[i] = id + 1;
    return id;
}

/* The calling thread's Python stack, innermost first, as new references to
 * code objects. Only with the GIL (the RAW domain is also called without).
 * Reading a frame may create its frame object, which allocates: the guard
 * is up, and the collector is held off so that no Python code runs in here
 * (3.11 collects right inside an allocation). */
static uint32_t
capture_stack(mt_site_frame *out, int max)
{
    if (max <= 0 || !PyGILState_Check()) {
        return 0;
    }
    PyThreadState *ts = PyGILState_GetThisThreadState();
    if (ts == NULL) {
        return 0;
    }
    int gc_was_on = PyGC_Disable();
    uint32_t n = 0;
    PyFrameObject *frame = PyThreadState_GetFrame(ts);
    while (frame != NULL && (int)n < max) {
        out[n].code = (PyObject *)PyFrame_GetCode(frame);
        out[n].line = PyFrame_GetLineNumber(frame);
        n++;
        PyFrameObject *back = PyFrame_GetBack(frame);
        Py_DECREF(frame); /* the interpreter's frame still owns it */
        frame = back;
    }
    Py_XDECREF(frame);
    if (gc_was_on) {
        PyGC_Enable();
    }
    return n;
}

static void
take_sample(mt_alloc_thread *t, size_t size, void *ptr)
{
    mt_site_frame stack[MT_ALLOC_MAX_FRAMES];
    t->guard = 1;
    redraw(t);
    int max = al.max_frames; /* only changed while stopped */
    uint32_t n = capture_stack(stack, max);
    uint32_t path = mt_phase_current_path_id();
    double mean = (double)atomic_load_explicit(&al.mean, memory_order_relaxed);
    double p = -expm1(-(double)size / mean); /* P(this block is sampled) */
    double weight = (double)size / p;

    mtx_lock(&mt_alloc_sample_lock);
    if (al.sites != NULL) {
        uint32_t id = site_find_locked(path, stack, n);
        mt_site *s = &al.sites[id];
        s->samples++;
        s->bytes += weight;
        s->count += weight / (double)size;
        al.samples++;
        mt_live_table *lt = atomic_load_explicit(&al.live, memory_order_relaxed);
        if (atomic_load_explicit(&al.live_count, memory_order_relaxed) >= LIVE_MAX) {
            al.untracked++;
        }
        else {
            if (lt->used + lt->gone >= LIVE_CAP / 2 || lt->inserted >= FILTER_REBUILD) {
                live_rebuild_locked();
                lt = atomic_load_explicit(&al.live, memory_order_relaxed);
            }
            live_put_locked(lt, (uintptr_t)ptr, id, weight);
            atomic_fetch_add_explicit(&al.live_count, 1, memory_order_relaxed);
            s->live += weight;
            s->live_samples++;
        }
    }
    mtx_unlock(&mt_alloc_sample_lock);
    for (uint32_t i = 0; i < n; i++) {
        Py_DECREF(stack[i].code); /* the frames still hold theirs */
    }
    t->guard = 0;
}

/* The slow path of account(): a new thread, a new start(), or a sample. Out
 * of line, so that the hot path keeps few registers to save. */
static void __attribute__((noinline, cold))
account_slow(mt_alloc_thread *t, size_t size, void *ptr)
{
    if (t->state == MT_ALLOC_THREAD_NEW) {
        t->guard = 1;
        register_thread(t);
        seed_thread(t, t->ordinal);
        t->guard = 0;
        return;
    }
    if (t->gen != atomic_load_explicit(&al.gen, memory_order_relaxed)) {
        seed_thread(t, t->ordinal); /* a new start(): its seed and interval */
        return;
    }
    take_sample(t, size, ptr);
}

static inline void
account_in(mt_alloc_thread *t, size_t size, void *ptr)
{
    if (t->guard || !atomic_load_explicit(&al.active, memory_order_relaxed)) {
        return;
    }
    t->count++;
    t->countdown -= (int64_t)size;
    if (t->countdown < 0) {
        account_slow(t, size, ptr);
    }
}

static inline void
account(size_t size, void *ptr)
{
    account_in(&mt_alloc_tls, size, ptr);
}

/* ------------------------------------------------------------------------ */
/* PEP 445 hooks: ctx is the PyMemAllocatorEx they replaced.                 */
/*                                                                           */
/* pymalloc (MEM and OBJ) hands blocks over 512 bytes to the RAW domain: the  */
/* MEM/OBJ hooks keep the guard up while they call the allocator they wrap,   */
/* so such a block is accounted once, in the domain the program asked.        */

static void *
hook_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    mt_alloc_thread *t = &mt_alloc_tls;
    int guard = t->guard;
    t->guard = 1;
    void *p = prev->malloc(prev->ctx, size);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, size, p);
    }
    return p;
}

static void *
hook_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    mt_alloc_thread *t = &mt_alloc_tls;
    int guard = t->guard;
    t->guard = 1;
    void *p = prev->calloc(prev->ctx, nelem, elsize);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, nelem * elsize, p); /* calloc checked the product */
    }
    return p;
}

/* A realloc is a free of the old block and an allocation of the new size.
 * Frees need no guard: a block that pymalloc passes on to the RAW domain is
 * looked up twice, and found (if sampled) only once. */
static void *
hook_realloc(void *ctx, void *ptr, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    mt_alloc_thread *t = &mt_alloc_tls;
    forget(ptr);
    int guard = t->guard;
    t->guard = 1;
    void *p = prev->realloc(prev->ctx, ptr, size);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, size, p);
    }
    return p;
}

static void
hook_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *prev = ctx;
    if (maybe_sampled(ptr)) {
        free_sampled(prev, ptr);
        return;
    }
    prev->free(prev->ctx, ptr);
}

/* When pymalloc serves MEM and OBJ (the default), it keeps requests of up to
 * 512 bytes and passes larger ones to the RAW domain. start() checks that
 * (probe_pymalloc) and then uses these hooks instead: they account only what
 * pymalloc keeps and leave the rest to the RAW hook, so they need no guard. */
#define MT_SMALL_REQUEST 512

static void *
small_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    void *p = prev->malloc(prev->ctx, size);
    if (size <= MT_SMALL_REQUEST && p != NULL) {
        account(size, p);
    }
    return p;
}

static void *
small_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    void *p = prev->calloc(prev->ctx, nelem, elsize);
    if (p != NULL && nelem * elsize <= MT_SMALL_REQUEST) { /* calloc checked the product */
        account(nelem * elsize, p);
    }
    return p;
}

/* The RAW domain wraps the system allocator, which calls no other domain. */
static void *
raw_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    void *p = prev->malloc(prev->ctx, size);
    if (p != NULL) {
        account(size, p);
    }
    return p;
}

static void *
raw_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    void *p = prev->calloc(prev->ctx, nelem, elsize);
    if (p != NULL) {
        account(nelem * elsize, p);
    }
    return p;
}

static void *
raw_realloc(void *ctx, void *ptr, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    forget(ptr);
    void *p = prev->realloc(prev->ctx, ptr, size);
    if (p != NULL) {
        account(size, p);
    }
    return p;
}

static void
raw_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *prev = ctx;
    if (maybe_sampled(ptr)) {
        free_sampled(prev, ptr);
        return;
    }
    prev->free(prev->ctx, ptr);
}

/* ------------------------------------------------------------------------ */
/* numpy's data allocator (NEP 49), found at run time: numpy is no build     */
/* dependency. The handler layout is numpy's version-1 PyDataMem_Handler.    */
/* The wrappers keep the guard up around the handler they wrap, as the MEM   */
/* and OBJ hooks do: a handler may allocate through a hooked Python domain   */
/* (numpy 2.5 on Python 3.12 does), which would count each array twice.      */

typedef struct {
    void *ctx;
    void *(*malloc)(void *ctx, size_t size);
    void *(*calloc)(void *ctx, size_t nelem, size_t elsize);
    void *(*realloc)(void *ctx, void *ptr, size_t new_size);
    void (*free)(void *ctx, void *ptr, size_t size);
} np_allocator;

typedef struct {
    char name[127];
    uint8_t version;
    np_allocator allocator;
} np_handler;

/* Indices into numpy's C-API table (stable numpy ABI, >= 1.22). */
#define NP_FEATURE_VERSION 211
#define NP_SET_HANDLER 304
#define NP_GET_HANDLER 305
#define NP_1_22_FEATURE 0x0000000f

/* All Protected by the GIL. np_prev_capsule keeps the previous handler alive
 * for good: arrays made through ours forward their frees to it. */
static np_allocator np_prev;
static PyObject *np_prev_capsule;
static PyObject *np_capsule; /* ours, made once and never freed */
static void **np_api;

static void *
np_malloc(void *ctx, size_t size)
{
    mt_alloc_thread *t = &mt_alloc_tls;
    int guard = t->guard;
    t->guard = 1;
    void *p = np_prev.malloc(np_prev.ctx, size);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, size, p);
    }
    return p;
}

static void *
np_calloc(void *ctx, size_t nelem, size_t elsize)
{
    mt_alloc_thread *t = &mt_alloc_tls;
    int guard = t->guard;
    t->guard = 1;
    void *p = np_prev.calloc(np_prev.ctx, nelem, elsize);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, nelem * elsize, p);
    }
    return p;
}

static void *
np_realloc(void *ctx, void *ptr, size_t size)
{
    forget(ptr);
    mt_alloc_thread *t = &mt_alloc_tls;
    int guard = t->guard;
    t->guard = 1;
    void *p = np_prev.realloc(np_prev.ctx, ptr, size);
    t->guard = guard;
    if (p != NULL) {
        account_in(t, size, p);
    }
    return p;
}

static void
np_free(void *ctx, void *ptr, size_t size)
{
    forget(ptr);
    np_prev.free(np_prev.ctx, ptr, size);
}

static np_handler np_ours = {
    .name = "memtrack",
    .version = 1,
    .allocator = {NULL, np_malloc, np_calloc, np_realloc, np_free},
};

/* install_numpy(api_capsule) -> bool: put memtrack's handler in front of
 * numpy's current one, for the current context (numpy keeps the handler in
 * a context variable: threads started later begin with numpy's default). */
PyObject *
mt_alloc_install_numpy(PyObject *module, PyObject *capsule)
{
    PyObject *current = NULL, *old = NULL, *result = NULL;
    if (!PyCapsule_CheckExact(capsule)) {
        PyErr_SetString(PyExc_TypeError, "install_numpy() takes numpy's _ARRAY_API capsule");
        goto done;
    }
    void **api = PyCapsule_GetPointer(capsule, NULL);
    if (api == NULL) {
        goto done;
    }
    unsigned (*feature)(void) = (unsigned (*)(void))api[NP_FEATURE_VERSION];
    if (feature() < NP_1_22_FEATURE) {
        PyErr_SetString(PyExc_RuntimeError,
                        "numpy is older than 1.22: it has no PyDataMem_SetHandler");
        goto done;
    }
    PyObject *(*get_handler)(void) = (PyObject * (*)(void)) api[NP_GET_HANDLER];
    PyObject *(*set_handler)(PyObject *) = (PyObject * (*)(PyObject *)) api[NP_SET_HANDLER];
    current = get_handler();
    if (current == NULL) {
        goto done;
    }
    if (current == np_capsule) {
        result = Py_NewRef(Py_False); /* already in place in this context */
        goto done;
    }
    if (np_capsule == NULL) {
        np_handler *prev = PyCapsule_GetPointer(current, "mem_handler");
        if (prev == NULL) {
            goto done;
        }
        if (prev->version != 1) {
            PyErr_Format(PyExc_RuntimeError, "numpy's memory handler is version %d, not 1",
                         prev->version);
            goto done;
        }
        np_capsule = PyCapsule_New(&np_ours, "mem_handler", NULL);
        if (np_capsule == NULL) {
            goto done;
        }
        np_prev = prev->allocator;
        np_prev_capsule = Py_NewRef(current);
        np_api = api;
    }
    else if (current != np_prev_capsule) {
        /* Another handler than the one ours forwards to: leave it alone. */
        PyErr_SetString(PyExc_RuntimeError,
                        "numpy has another memory handler in this context; memtrack's "
                        "forwards to the one it first found and cannot stack on a second");
        goto done;
    }
    old = set_handler(np_capsule);
    if (old == NULL) {
        goto done;
    }
    result = Py_NewRef(Py_True);
done:
    Py_XDECREF(current);
    Py_XDECREF(old);
    return result;
}

/* Put numpy's previous handler back in this context if ours is in force. */
PyObject *
mt_alloc_uninstall_numpy(PyObject *module, PyObject *unused)
{
    if (np_api == NULL) {
        Py_RETURN_FALSE;
    }
    PyObject *(*get_handler)(void) = (PyObject * (*)(void)) np_api[NP_GET_HANDLER];
    PyObject *(*set_handler)(PyObject *) = (PyObject * (*)(PyObject *)) np_api[NP_SET_HANDLER];
    PyObject *current = get_handler();
    if (current == NULL) {
        return NULL;
    }
    int ours = current == np_capsule;
    Py_DECREF(current);
    if (!ours) {
        Py_RETURN_FALSE;
    }
    PyObject *old = set_handler(np_prev_capsule);
    if (old == NULL) {
        return NULL;
    }
    Py_DECREF(old);
    Py_RETURN_TRUE;
}

/* ------------------------------------------------------------------------ */
/* Process-wide set-up and fork                                              */

int
mt_alloc_init(void)
{
    if (mtx_init(&mt_alloc_sample_lock, mtx_plain) != thrd_success ||
        mtx_init(&threads_lock, mtx_plain) != thrd_success ||
        tss_create(&thread_key, thread_ended) != thrd_success) {
        return -1;
    }
    threads_head.next = threads_head.prev = &threads_head;
    return 0;
}

void
mt_alloc_before_fork(void)
{
    mtx_lock(&threads_lock);
    mtx_lock(&mt_alloc_sample_lock);
}

void
mt_alloc_after_fork_parent(void)
{
    mtx_unlock(&mt_alloc_sample_lock);
    mtx_unlock(&threads_lock);
}

/* The child's counters and samples describe its own work: they start at
 * zero. The sites keep their stacks (their code objects cannot be released
 * here: no Python in an at-fork handler) but lose their numbers. Only the
 * forking thread survives, so it is the only thread listed. */
void
mt_alloc_after_fork_child(void)
{
    mtx_unlock(&mt_alloc_sample_lock);
    mtx_unlock(&threads_lock);
    mt_alloc_thread *t = &mt_alloc_tls;
    threads_head.next = threads_head.prev = &threads_head;
    retired_bytes = retired_count = 0;
    if (t->state == MT_ALLOC_THREAD_LISTED) {
        t->next = &threads_head;
        t->prev = &threads_head;
        threads_head.next = threads_head.prev = t;
    }
    t->bytes_base = 0;
    t->drawn = t->countdown;
    t->count = 0;
    atomic_store(&t->pub_bytes, 0);
    atomic_store(&t->pub_count, 0);
    t->rng ^= 0xA0761D6478BD642Full ^ (uint64_t)mt_os_pid(); /* not the parent's draws */
    for (uint32_t i = 0; i < al.nsites; i++) {
        mt_site *s = &al.sites[i];
        s->samples = 0;
        s->bytes = s->count = s->live = 0;
        s->live_samples = 0;
    }
    al.samples = al.dropped_frames = al.untracked = 0;
    for (int i = 0; i < 2; i++) {
        if (al.tables[i] != NULL) {
            live_clear_locked(al.tables[i]);
        }
    }
    atomic_store(&al.live_count, 0);
}

/* ------------------------------------------------------------------------ */
/* Python entry points                                                       */

static int
allocate_tables(void)
{
    if (al.sites != NULL) {
        return 0;
    }
    mt_site *sites = calloc(SITE_CAP, sizeof *sites);
    mt_site_frame *frames = calloc((size_t)SITE_CAP * MT_ALLOC_MAX_FRAMES, sizeof *frames);
    uint32_t *index = calloc(SITE_INDEX, sizeof *index);
    mt_live_table *a = calloc(1, sizeof *a), *b = calloc(1, sizeof *b);
    if (!sites || !frames || !index || !a || !b) {
        free(sites);
        free(frames);
        free(index);
        free(a);
        free(b);
        return -1;
    }
    mtx_lock(&mt_alloc_sample_lock);
    al.sites = sites;
    al.frames = frames;
    al.index = index;
    al.tables[0] = a;
    al.tables[1] = b;
    atomic_store(&al.live, a);
    /* site 0 collects the samples that find the table full */
    al.sites[0] = (mt_site){.hash = 0, .path_id = 0, .nframes = 0, .frames = al.frames};
    al.nsites = 1;
    mtx_unlock(&mt_alloc_sample_lock);
    return 0;
}

/* The probe: a RAW hook that counts the calls of one thread. GIL held. */
static unsigned long probe_thread;
static int probe_calls;

static void *
probe_raw_malloc(void *ctx, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    if (PyThread_get_thread_ident() == probe_thread) {
        probe_calls++;
    }
    return prev->malloc(prev->ctx, size);
}

static void *
probe_raw_calloc(void *ctx, size_t nelem, size_t elsize)
{
    PyMemAllocatorEx *prev = ctx;
    return prev->calloc(prev->ctx, nelem, elsize);
}

static void *
probe_raw_realloc(void *ctx, void *ptr, size_t size)
{
    PyMemAllocatorEx *prev = ctx;
    return prev->realloc(prev->ctx, ptr, size);
}

static void
probe_raw_free(void *ctx, void *ptr)
{
    PyMemAllocatorEx *prev = ctx;
    prev->free(prev->ctx, ptr);
}

/* Does the allocator of `d` keep requests of up to MT_SMALL_REQUEST bytes to
 * itself and pass larger ones to the RAW domain (pymalloc without debug
 * hooks)? al.prev holds the allocators in place; GIL held. */
static int
forwards_large_to_raw(PyMemAllocatorDomain d)
{
    const size_t sizes[2] = {MT_SMALL_REQUEST, MT_SMALL_REQUEST + 1};
    const int expect[2] = {0, 1};
    for (int i = 0; i < 2; i++) {
        probe_calls = 0;
        void *p = al.prev[d].malloc(al.prev[d].ctx, sizes[i]);
        int calls = probe_calls;
        if (p == NULL || calls != expect[i]) {
            if (p != NULL) {
                al.prev[d].free(al.prev[d].ctx, p);
            }
            return 0;
        }
        al.prev[d].free(al.prev[d].ctx, p);
    }
    return 1;
}

static int
probe_pymalloc(void)
{
    PyMemAllocatorEx probe = {&al.prev[DOMAIN_RAW], probe_raw_malloc, probe_raw_calloc,
                              probe_raw_realloc, probe_raw_free};
    probe_thread = PyThread_get_thread_ident();
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &probe);
    int ok = forwards_large_to_raw(PYMEM_DOMAIN_MEM) && forwards_large_to_raw(PYMEM_DOMAIN_OBJ);
    PyMem_SetAllocator(PYMEM_DOMAIN_RAW, &al.prev[DOMAIN_RAW]);
    probe_thread = 0;
    return ok;
}

static int
hooks_are_ours(void)
{
    for (int d = 0; d < NDOMAINS; d++) {
        PyMemAllocatorEx cur;
        PyMem_GetAllocator((PyMemAllocatorDomain)d, &cur);
        if (cur.ctx != &al.prev[d]) {
            return 0;
        }
    }
    return 1;
}

/* start(interval, frames, seed): seed < 0 picks one from the clock. */
PyObject *
mt_alloc_start(PyObject *module, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"interval", "frames", "seed", NULL};
    long long interval = 512 * 1024, seed = -1;
    int frames = 16;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$LiL:start", kwlist, &interval, &frames,
                                     &seed)) {
        return NULL;
    }
    if (interval < 1 || interval > (1LL << 40)) {
        PyErr_Format(PyExc_ValueError, "interval must be between 1 byte and 1 TiB, not %lld",
                     interval);
        return NULL;
    }
    if (frames < 0 || frames > MT_ALLOC_MAX_FRAMES) {
        PyErr_Format(PyExc_ValueError, "frames must be between 0 and %d, not %d",
                     MT_ALLOC_MAX_FRAMES, frames);
        return NULL;
    }
    if (atomic_load(&al.active)) {
        PyErr_SetString(PyExc_RuntimeError, "allocation tracking is already running");
        return NULL;
    }
    if (allocate_tables() < 0) {
        return PyErr_NoMemory();
    }
    uint64_t s = seed >= 0 ? (uint64_t)seed : (uint64_t)(mt_os_monotonic() * 1e9) ^ (uint64_t)mt_os_pid();
    atomic_store(&al.seed, s);
    atomic_store(&al.mean, interval);
    al.max_frames = frames;
    atomic_fetch_add(&al.gen, 1);
    /* The calling thread starts on the new seed at once (others on their next
     * sample), so a fixed seed gives the same samples run after run. */
    mt_alloc_thread *t = &mt_alloc_tls;
    if (t->state == MT_ALLOC_THREAD_NEW) {
        register_thread(t);
    }
    seed_thread(t, 0);
    if (!al.installed) {
        PyMemAllocatorEx hook = {NULL, hook_malloc, hook_calloc, hook_realloc, hook_free};
        PyMemAllocatorEx raw = {NULL, raw_malloc, raw_calloc, raw_realloc, raw_free};
        for (int d = 0; d < NDOMAINS; d++) {
            PyMem_GetAllocator((PyMemAllocatorDomain)d, &al.prev[d]);
        }
        al.small_hooks = probe_pymalloc();
        if (al.small_hooks) {
            hook.malloc = small_malloc;
            hook.calloc = small_calloc;
        }
        for (int d = 0; d < NDOMAINS; d++) {
            PyMemAllocatorEx *h = d == DOMAIN_RAW ? &raw : &hook;
            h->ctx = &al.prev[d];
            PyMem_SetAllocator((PyMemAllocatorDomain)d, h);
        }
        al.installed = 1;
    }
    static unsigned sessions; /* GIL */
    if (++sessions == 0) {
        sessions = 1; /* 0 means off */
    }
    atomic_store(&mt_alloc_session, sessions);
    atomic_store(&al.active, true);
    Py_RETURN_NONE;
}

/* stop() -> bool: whether the hooks came out (False: another hook, such as
 * tracemalloc's, went in on top of them; they stay and only forward). */
PyObject *
mt_alloc_stop(PyObject *module, PyObject *unused)
{
    int removed = 0;
    if (!atomic_load(&al.active)) {
        Py_RETURN_FALSE;
    }
    atomic_store(&al.active, false);
    atomic_store(&mt_alloc_session, 0);
    if (al.installed && hooks_are_ours()) {
        for (int d = 0; d < NDOMAINS; d++) {
            PyMem_SetAllocator((PyMemAllocatorDomain)d, &al.prev[d]);
        }
        al.installed = 0;
        removed = 1;
    }
    /* Frees are no longer seen: the live bytes of each site stay as they are
     * now ("retained at stop"), and the stale pointers leave the set. */
    mtx_lock(&mt_alloc_sample_lock);
    for (int i = 0; i < 2; i++) {
        live_clear_locked(al.tables[i]);
    }
    atomic_store(&al.live_count, 0);
    mtx_unlock(&mt_alloc_sample_lock);
    return PyBool_FromLong(removed);
}

/* clear(): forget every site (and release its code objects). */
PyObject *
mt_alloc_clear(PyObject *module, PyObject *unused)
{
    PyObject **codes = NULL;
    size_t ncodes = 0;
    if (al.sites == NULL) {
        Py_RETURN_NONE;
    }
    /* Buffers sized by what is there: a large transient malloc would move
     * glibc's mmap threshold and change how the process's heap behaves. */
    mtx_lock(&mt_alloc_sample_lock);
    for (uint32_t i = 0; i < al.nsites; i++) {
        ncodes += al.sites[i].nframes;
    }
    codes = malloc((ncodes ? ncodes : 1) * sizeof *codes);
    if (codes == NULL) {
        mtx_unlock(&mt_alloc_sample_lock);
        return PyErr_NoMemory(); /* the sites stay, with their references */
    }
    ncodes = 0;
    for (uint32_t i = 0; i < al.nsites; i++) {
        for (uint32_t j = 0; j < al.sites[i].nframes; j++) {
            codes[ncodes++] = al.sites[i].frames[j].code;
        }
    }
    memset(al.index, 0, SITE_INDEX * sizeof *al.index);
    al.sites[0] = (mt_site){.frames = al.frames};
    al.nsites = 1;
    al.samples = al.dropped_frames = al.untracked = 0;
    for (int i = 0; i < 2; i++) {
        live_clear_locked(al.tables[i]);
    }
    atomic_store(&al.live_count, 0);
    mtx_unlock(&mt_alloc_sample_lock);
    for (size_t i = 0; i < ncodes; i++) {
        Py_DECREF(codes[i]); /* may free: the lock is not held */
    }
    free(codes);
    Py_RETURN_NONE;
}

/* counters() -> dict: exact totals, this thread's and every thread's. */
PyObject *
mt_alloc_counters(PyObject *module, PyObject *unused)
{
    PyObject *threads = PyDict_New(), *result = NULL;
    uint64_t bytes, count;
    uint64_t (*pairs)[3] = NULL;
    size_t n = 0, cap = 0;
    if (threads == NULL) {
        return NULL;
    }
    mtx_lock(&threads_lock);
    bytes = retired_bytes;
    count = retired_count;
    for (mt_alloc_thread *t = threads_head.next; t != &threads_head; t = t->next) {
        cap++;
    }
    pairs = malloc((cap ? cap : 1) * sizeof *pairs);
    for (mt_alloc_thread *t = threads_head.next; pairs && t != &threads_head; t = t->next) {
        uint64_t b, c;
        if (t == &mt_alloc_tls) {
            mt_alloc_thread_counts(&b, &c); /* this thread: exact */
        }
        else { /* another thread: as of its latest sample */
            b = atomic_load_explicit(&t->pub_bytes, memory_order_relaxed);
            c = atomic_load_explicit(&t->pub_count, memory_order_relaxed);
        }
        bytes += b;
        count += c;
        pairs[n][0] = t->ident;
        pairs[n][1] = b;
        pairs[n][2] = c;
        n++;
    }
    mtx_unlock(&threads_lock);
    if (pairs == NULL) {
        Py_DECREF(threads);
        return PyErr_NoMemory();
    }
    for (size_t i = 0; i < n; i++) {
        PyObject *key = PyLong_FromUnsignedLongLong(pairs[i][0]);
        PyObject *val = Py_BuildValue("(KK)", (unsigned long long)pairs[i][1],
                                      (unsigned long long)pairs[i][2]);
        if (key == NULL || val == NULL || PyDict_SetItem(threads, key, val) < 0) {
            Py_XDECREF(key);
            Py_XDECREF(val);
            goto done;
        }
        Py_DECREF(key);
        Py_DECREF(val);
    }
    mtx_lock(&mt_alloc_sample_lock);
    unsigned long long samples = al.samples, untracked = al.untracked, sites = al.nsites ? al.nsites - 1 : 0,
                       live = atomic_load(&al.live_count);
    mtx_unlock(&mt_alloc_sample_lock);
    uint64_t my_bytes, my_count;
    mt_alloc_thread_counts(&my_bytes, &my_count);
    result = Py_BuildValue(
        "{s:O,s:K,s:K,s:(KK),s:O,s:K,s:K,s:K,s:K,s:L,s:i,s:O}", "running",
        atomic_load(&al.active) ? Py_True : Py_False, "allocated", (unsigned long long)bytes,
        "allocations", (unsigned long long)count, "thread",
        (unsigned long long)my_bytes, (unsigned long long)my_count,
        "threads", threads, "samples", samples, "sites", sites, "live_samples", live,
        "untracked", untracked, "interval", (long long)atomic_load(&al.mean), "frames",
        al.max_frames, "pymalloc_split", al.small_hooks ? Py_True : Py_False);
done:
    free(pairs);
    Py_DECREF(threads);
    return result;
}

/* sites() -> list of (path, frames, samples, bytes, count, live, live_samples,
 * overflow) with frames a tuple of (filename, line, qualname), innermost
 * first; overflow is True for the samples that found the site table full. */
PyObject *
mt_alloc_sites(PyObject *module, PyObject *unused)
{
    mt_site *copy = NULL;
    uint32_t *ids = NULL;
    mt_site_frame *frames = NULL;
    uint32_t n = 0;
    size_t used = 0;
    PyObject *list = NULL;
    if (al.sites == NULL) {
        return PyList_New(0);
    }
    /* Sized by what is there (see mt_alloc_clear). libc's malloc is not
     * hooked, so it may be called with the lock held. */
    mtx_lock(&mt_alloc_sample_lock);
    size_t nframes = 0, nsites = 0;
    for (uint32_t i = 0; i < al.nsites; i++) {
        if (al.sites[i].samples != 0) {
            nsites++;
            nframes += al.sites[i].nframes;
        }
    }
    copy = malloc((nsites ? nsites : 1) * sizeof *copy);
    ids = malloc((nsites ? nsites : 1) * sizeof *ids);
    frames = malloc((nframes ? nframes : 1) * sizeof *frames);
    if (copy == NULL || ids == NULL || frames == NULL) {
        mtx_unlock(&mt_alloc_sample_lock);
        PyErr_NoMemory();
        goto done;
    }
    for (uint32_t i = 0; i < al.nsites; i++) {
        const mt_site *s = &al.sites[i];
        if (s->samples == 0) {
            continue;
        }
        copy[n] = *s;
        copy[n].frames = &frames[used];
        ids[n] = i;
        for (uint32_t j = 0; j < s->nframes; j++) {
            frames[used++] = s->frames[j];
            Py_INCREF(s->frames[j].code); /* clear() may run while we build */
        }
        n++;
    }
    mtx_unlock(&mt_alloc_sample_lock);
    list = PyList_New(n);
    for (uint32_t i = 0; list != NULL && i < n; i++) {
        const mt_site *s = &copy[i];
        PyObject *stack = PyTuple_New(s->nframes);
        for (uint32_t j = 0; stack != NULL && j < s->nframes; j++) {
            PyCodeObject *code = (PyCodeObject *)s->frames[j].code;
            PyObject *f = Py_BuildValue("(OiO)", code->co_filename, s->frames[j].line,
                                        code->co_qualname);
            if (f == NULL) {
                Py_CLEAR(stack);
                break;
            }
            PyTuple_SET_ITEM(stack, j, f);
        }
        const char *path = mt_phase_path_of(s->path_id);
        PyObject *item =
            stack == NULL ? NULL
                          : Py_BuildValue("(sNKdddKO)", path, stack, (unsigned long long)s->samples,
                                          s->bytes, s->count, s->live,
                                          (unsigned long long)s->live_samples,
                                          ids[i] == SITE_OTHER ? Py_True : Py_False);
        if (item == NULL) {
            Py_CLEAR(list);
            break;
        }
        PyList_SET_ITEM(list, i, item);
    }
done:
    for (size_t i = 0; i < used; i++) {
        Py_DECREF(frames[i].code);
    }
    free(copy);
    free(ids);
    free(frames);
    return list;
}
