/*
 * Windows readings: GetProcessMemoryInfo (PROCESS_MEMORY_COUNTERS_EX),
 * QueryWorkingSet for shared and private pages, job objects for limits,
 * named file mappings (CreateFileMapping) for the worker table and process
 * handles for liveness. Plain C11 and Win32, no Python; built by setup.py
 * on Windows and cross-compiled here with mingw-w64 for the C tests in
 * tests/ (run under wine). See README.md for what is approximate.
 */
#ifndef _WIN32_WINNT
#define _WIN32_WINNT 0x0602 /* Windows 8: GetSystemTimePreciseAsFileTime */
#endif
#ifndef PSAPI_VERSION
#define PSAPI_VERSION 2 /* psapi calls resolve to kernel32's K32* */
#endif
#include "../platform.h"

#include <windows.h>

#include <aclapi.h>
#include <bcrypt.h>
#include <errno.h>
#include <io.h>
#include <malloc.h>
#include <psapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <tlhelp32.h>

/* Set once by mt_os_init() (under the GIL, before any reader thread) and
 * read-only afterwards. Windows has no fork(), so nothing is ever reopened. */
static struct {
    double ticks_per_second; /* QueryPerformanceFrequency */
    uint64_t page_size;
    long pid;
} os = {0.0, 4096, 0};

/* The errno closest to a Win32 error, so that mt_oserr reads as on POSIX. */
static int
errno_of(DWORD err)
{
    switch (err) {
    case ERROR_FILE_NOT_FOUND:
    case ERROR_PATH_NOT_FOUND:
    case ERROR_INVALID_NAME:
        return ENOENT;
    case ERROR_ACCESS_DENIED:
    case ERROR_PRIVILEGE_NOT_HELD:
        return EACCES;
    case ERROR_ALREADY_EXISTS:
    case ERROR_FILE_EXISTS:
        return EEXIST;
    case ERROR_NOT_ENOUGH_MEMORY:
    case ERROR_OUTOFMEMORY:
    case ERROR_COMMITMENT_LIMIT:
        return ENOMEM;
    case ERROR_INVALID_PARAMETER:
    case ERROR_INVALID_HANDLE:
        return EINVAL;
    case ERROR_BAD_LENGTH:
    case ERROR_INSUFFICIENT_BUFFER:
        return ERANGE;
    case ERROR_NOT_SUPPORTED:
    case ERROR_CALL_NOT_IMPLEMENTED:
        return ENOSYS;
    default:
        return EIO;
    }
}

static int
win_fail(mt_oserr *e, const char *call, const char *path)
{
    return mt_fail(e, call, path, errno_of(GetLastError()));
}

int
mt_os_init(mt_oserr *e)
{
    LARGE_INTEGER freq;
    SYSTEM_INFO si;
    (void)e;
    if (os.ticks_per_second > 0.0) {
        return 0;
    }
    /* Cannot fail on Windows XP and later. */
    QueryPerformanceFrequency(&freq);
    GetSystemInfo(&si);
    os.page_size = si.dwPageSize ? si.dwPageSize : 4096;
    os.pid = (long)GetCurrentProcessId();
    os.ticks_per_second = (double)freq.QuadPart;
    return 0;
}

/* No fork() on Windows: a child is a new process that runs mt_os_init(). */
void
mt_os_after_fork_child(void)
{
}

int
mt_os_register_atfork(void (*prepare)(void), void (*parent)(void), void (*child)(void))
{
    (void)prepare;
    (void)parent;
    (void)child;
    return 0;
}

/* QueryWorkingSetEx gives every resident page with its share count, so USS,
 * PSS and shared are real (PSS approximately: see below) where the Shared
 * bit works. Missing: the heap (no cheap summary of the CRT heap), swap
 * (the page file holds commit, not swapped-out pages of this process), the
 * anon/file/shmem split of the working set, minor/major faults
 * (PageFaultCount counts soft and hard faults together) and a reset of
 * PeakWorkingSetSize. */
static int shared_bit_works(void);

unsigned
mt_os_missing(void)
{
    unsigned missing = MT_LACKS_HEAP | MT_LACKS_SWAP | MT_LACKS_RSS_SPLIT | MT_LACKS_FAULTS |
                       MT_LACKS_PEAK_RESET;
    if (!shared_bit_works()) {
        missing |= MT_LACKS_PSS; /* uss counts every resident page, shared 0 */
    }
    return missing;
}

double
mt_os_monotonic(void)
{
    LARGE_INTEGER now;
    QueryPerformanceCounter(&now);
    if (os.ticks_per_second <= 0.0) { /* before mt_os_init(): the C tests */
        LARGE_INTEGER freq;
        QueryPerformanceFrequency(&freq);
        return (double)now.QuadPart / (double)freq.QuadPart;
    }
    return (double)now.QuadPart / os.ticks_per_second;
}

long
mt_os_pid(void)
{
    return os.pid ? os.pid : (long)GetCurrentProcessId();
}

static int
counters_of(HANDLE process, PROCESS_MEMORY_COUNTERS_EX *c)
{
    memset(c, 0, sizeof *c);
    c->cb = sizeof *c;
    return GetProcessMemoryInfo(process, (PROCESS_MEMORY_COUNTERS *)c, sizeof *c) ? 0 : -1;
}

/* The commit charge of a process: PrivateUsage, or PagefileUsage where a
 * Windows emulation leaves PrivateUsage 0 (both count the same pages). */
static uint64_t
commit_of(const PROCESS_MEMORY_COUNTERS_EX *c)
{
    return c->PrivateUsage ? (uint64_t)c->PrivateUsage : (uint64_t)c->PagefileUsage;
}

/* HeapCompact gives free blocks of the process heap (where the UCRT's
 * malloc lives) back to the OS; it does not say whether it did, so compare
 * the commit charge. */
int
mt_os_trim(void)
{
    PROCESS_MEMORY_COUNTERS_EX before, after;
    HANDLE self = GetCurrentProcess();
    int known = counters_of(self, &before) == 0;
    HeapCompact(GetProcessHeap(), 0);
    _heapmin();
    return known && counters_of(self, &after) == 0 && commit_of(&after) < commit_of(&before);
}

/* Sleep() rounds up to the system timer tick (15.6 ms by default); a
 * high-resolution waitable timer (Windows 10 1803+) sleeps what was asked.
 * Where it is missing, Sleep() in whole milliseconds is the fallback. */
#ifndef CREATE_WAITABLE_TIMER_HIGH_RESOLUTION
#define CREATE_WAITABLE_TIMER_HIGH_RESOLUTION 0x00000002
#endif

void
mt_os_sleep(double seconds)
{
    if (seconds <= 0.0) {
        return;
    }
    HANDLE timer = CreateWaitableTimerExW(NULL, NULL, CREATE_WAITABLE_TIMER_HIGH_RESOLUTION,
                                          TIMER_ALL_ACCESS);
    LARGE_INTEGER due;
    due.QuadPart = -(LONGLONG)(seconds * 1e7); /* relative, in 100 ns */
    if (timer != NULL && SetWaitableTimer(timer, &due, 0, NULL, NULL, FALSE)) {
        WaitForSingleObject(timer, INFINITE);
    }
    else {
        double ms = seconds * 1000.0;
        Sleep((DWORD)ms + ((double)(DWORD)ms < ms ? 1 : 0));
    }
    if (timer != NULL) {
        CloseHandle(timer);
    }
}

int
mt_os_rss(uint64_t *rss, mt_oserr *e)
{
    PROCESS_MEMORY_COUNTERS_EX c;
    if (counters_of(GetCurrentProcess(), &c) < 0) {
        return win_fail(e, "GetProcessMemoryInfo", NULL);
    }
    *rss = (uint64_t)c.WorkingSetSize;
    return 0;
}

/* PeakWorkingSetSize is kept by the kernel and never stale, so the fast and
 * the exact high-water mark are the same reading. It cannot be reset. */
int
mt_os_hwm(uint64_t *hwm, mt_oserr *e)
{
    PROCESS_MEMORY_COUNTERS_EX c;
    if (counters_of(GetCurrentProcess(), &c) < 0) {
        return win_fail(e, "GetProcessMemoryInfo", NULL);
    }
    *hwm = (uint64_t)c.PeakWorkingSetSize;
    return 0;
}

int
mt_os_hwm_exact(uint64_t *hwm, uint64_t *rss, mt_oserr *e)
{
    return (mt_os_hwm(hwm, e) < 0 || mt_os_rss(rss, e) < 0) ? -1 : 0;
}

/* EmptyWorkingSet or SetProcessWorkingSetSize(-1, -1) trim the working set
 * but leave PeakWorkingSetSize where it was: peak.c's sampler is the peak
 * method here (MT_LACKS_PEAK_RESET). */
int
mt_os_reset_hwm(mt_oserr *e)
{
    return mt_fail(e, "reset of PeakWorkingSetSize", NULL, ENOSYS);
}

/* MT_LACKS_HEAP: HeapSummary/HeapWalk cost a walk of the heap, too slow for
 * a phase boundary. */
int
mt_os_heap(uint64_t *used, uint64_t *free_bytes)
{
    *used = 0;
    *free_bytes = 0;
    return 0;
}

int
mt_os_sample(mt_sample *s, mt_oserr *e)
{
    PROCESS_MEMORY_COUNTERS_EX c;
    MEMORYSTATUSEX ms;
    memset(s, 0, sizeof *s);
    s->time = mt_os_monotonic();
    if (counters_of(GetCurrentProcess(), &c) < 0) {
        return win_fail(e, "GetProcessMemoryInfo", NULL);
    }
    s->rss = (uint64_t)c.WorkingSetSize;
    s->peak_rss = (uint64_t)c.PeakWorkingSetSize;
    /* The address space reserved or committed by this process: what Linux
     * calls VmSize. */
    ms.dwLength = sizeof ms;
    if (!GlobalMemoryStatusEx(&ms)) {
        return win_fail(e, "GlobalMemoryStatusEx", NULL);
    }
    s->vms = (uint64_t)(ms.ullTotalVirtual - ms.ullAvailVirtual);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Footprint from the working set: the state of every committed page.      */

/*
 * QueryWorkingSetEx tells, for each page asked about, whether it is
 * resident (Valid), shareable (Shared) and by how many processes it is
 * mapped (ShareCount). The pages asked about are the committed ones, found
 * with VirtualQueryEx; the cost is one call per 4096 committed pages.
 * (QueryWorkingSet lists resident pages directly, but wine lacks it, and
 * one tested path is better than two.)
 *
 * A page counts as private when it is not shareable or only this process
 * maps it (as Linux's Private_*), as shared otherwise. ShareCount stops at
 * 7, so a page shared by more than 7 processes adds 1/7 of a page to PSS
 * instead of less: PSS is exact up to 7 sharers and an upper bound beyond.
 * A shareable page with a ShareCount of 0 (not seen on Windows) is counted
 * shared and whole into PSS, the upper bound again.
 */
#define WS_BATCH 4096

static int
working_set_footprint(HANDLE process, mt_footprint *fp, mt_oserr *e)
{
    PSAPI_WORKING_SET_EX_INFORMATION *batch = malloc(WS_BATCH * sizeof *batch);
    MEMORY_BASIC_INFORMATION region;
    uint64_t pss_parts = 0; /* PSS in 1/420 pages: exact for 1..7 sharers */
    int rc = -1;
    memset(fp, 0, sizeof *fp);
    if (batch == NULL) {
        mt_fail(e, "malloc", NULL, ENOMEM);
        goto done;
    }
    const char *addr = NULL;
    while (VirtualQueryEx(process, addr, &region, sizeof region) == sizeof region) {
        const char *base = region.BaseAddress;
        const char *next = base + region.RegionSize;
        if (next <= addr) {
            break; /* the top of the address space */
        }
        addr = next;
        if (region.State != MEM_COMMIT) {
            continue;
        }
        for (const char *page = base; page < next;) {
            size_t n = 0;
            for (; n < WS_BATCH && page < next; n++, page += os.page_size) {
                batch[n].VirtualAddress = (void *)page;
            }
            if (!QueryWorkingSetEx(process, batch, (DWORD)(n * sizeof *batch))) {
                win_fail(e, "QueryWorkingSetEx", NULL);
                goto done;
            }
            for (size_t i = 0; i < n; i++) {
                PSAPI_WORKING_SET_EX_BLOCK b = batch[i].VirtualAttributes;
                unsigned sharers = (unsigned)b.ShareCount;
                if (!b.Valid) {
                    continue;
                }
                if (!b.Shared || sharers == 1) {
                    fp->uss += os.page_size;
                    pss_parts += 420;
                }
                else {
                    fp->shared += os.page_size;
                    pss_parts += sharers ? 420 / sharers : 420;
                }
            }
        }
    }
    fp->pss = pss_parts * os.page_size / 420;
    rc = 0;
done:
    free(batch);
    return rc;
}

/* Whether the working-set information counts sharers: the code of
 * ntdll.dll is mapped by every process, so on Windows its page is shared
 * with a ShareCount of 2 or more. wine 8 sets the Shared bit but a
 * ShareCount of 1 everywhere: it cannot tell shared pages from private. */
static int
shared_bit_works(void)
{
    PSAPI_WORKING_SET_EX_INFORMATION probe;
    HMODULE ntdll = GetModuleHandleW(L"ntdll.dll");
    FARPROC code = ntdll ? GetProcAddress(ntdll, "NtQueryVirtualMemory") : NULL;
    if (code == NULL) {
        return 0;
    }
    probe.VirtualAddress = (void *)(uintptr_t)code;
    return QueryWorkingSetEx(GetCurrentProcess(), &probe, sizeof probe) &&
           probe.VirtualAttributes.Valid && probe.VirtualAttributes.Shared &&
           probe.VirtualAttributes.ShareCount >= 2;
}

int
mt_os_footprint(mt_footprint *fp, mt_oserr *e)
{
    return working_set_footprint(GetCurrentProcess(), fp, e);
}

/* ------------------------------------------------------------------------ */
/* Job-object limits: what a Windows container or a CI runner sets.         */

/* The commit charge of every process in this process's job (the job's
 * limit counts all of them); processes not ours to open are left out. */
static int
job_commit(uint64_t *used, mt_oserr *e)
{
    JOBOBJECT_BASIC_PROCESS_ID_LIST *list = NULL;
    DWORD room = 256;
    int rc = -1;
    *used = 0;
    for (int attempt = 0; attempt < 8; attempt++) {
        size_t bytes = sizeof *list + (size_t)room * sizeof(ULONG_PTR);
        list = malloc(bytes);
        if (list == NULL) {
            mt_fail(e, "malloc", NULL, ENOMEM);
            goto done;
        }
        if (QueryInformationJobObject(NULL, JobObjectBasicProcessIdList, list, (DWORD)bytes,
                                      NULL) ||
            GetLastError() == ERROR_MORE_DATA) {
            if (list->NumberOfProcessIdsInList >= list->NumberOfAssignedProcesses) {
                break;
            }
        }
        else {
            win_fail(e, "QueryInformationJobObject", NULL);
            goto done;
        }
        room = list->NumberOfAssignedProcesses + 64; /* it grew: ask again */
        free(list);
        list = NULL;
    }
    if (list == NULL) {
        mt_fail(e, "QueryInformationJobObject", NULL, ERANGE);
        goto done;
    }
    for (DWORD i = 0; i < list->NumberOfProcessIdsInList; i++) {
        PROCESS_MEMORY_COUNTERS_EX c;
        HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE,
                               (DWORD)list->ProcessIdList[i]);
        if (h != NULL) {
            if (counters_of(h, &c) == 0) {
                *used += commit_of(&c);
            }
            CloseHandle(h);
        }
    }
    rc = 0;
done:
    free(list);
    return rc;
}

/* Job limits count committed memory (PrivateUsage), not the working set.
 * With nested jobs (Windows 8+) only the innermost job is read. */
int
mt_os_memory_limit(mt_memory_limit *m, mt_oserr *e)
{
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION info;
    PROCESS_MEMORY_COUNTERS_EX self;
    BOOL in_job = FALSE;
    int found = 0;
    if (!IsProcessInJob(GetCurrentProcess(), NULL, &in_job)) {
        return win_fail(e, "IsProcessInJob", NULL);
    }
    if (!in_job) {
        return 0;
    }
    if (!QueryInformationJobObject(NULL, JobObjectExtendedLimitInformation, &info, sizeof info,
                                   NULL)) {
        return win_fail(e, "QueryInformationJobObject", NULL);
    }
    DWORD flags = info.BasicLimitInformation.LimitFlags;
    if (flags & JOB_OBJECT_LIMIT_PROCESS_MEMORY) {
        if (counters_of(GetCurrentProcess(), &self) < 0) {
            return win_fail(e, "GetProcessMemoryInfo", NULL);
        }
        m->limit = (uint64_t)info.ProcessMemoryLimit;
        m->used = commit_of(&self);
        m->source = "job object (process memory)";
        found = 1;
    }
    if (flags & JOB_OBJECT_LIMIT_JOB_MEMORY) {
        uint64_t used;
        if (job_commit(&used, e) < 0) {
            return -1;
        }
        uint64_t limit = (uint64_t)info.JobMemoryLimit;
        uint64_t room = limit > used ? limit - used : 0;
        if (!found || room < (m->limit > m->used ? m->limit - m->used : 0)) {
            m->limit = limit;
            m->used = used;
            m->source = "job object (job memory)";
        }
        found = 1;
    }
    return found;
}

/* ------------------------------------------------------------------------ */
/* Small things.                                                            */

/* FILETIME: 100 ns since 1601-01-01. */
static uint64_t
filetime_u64(FILETIME ft)
{
    return ((uint64_t)ft.dwHighDateTime << 32) | ft.dwLowDateTime;
}

double
mt_os_wall_time(void)
{
    FILETIME ft;
    GetSystemTimePreciseAsFileTime(&ft);
    /* 11644473600 s from 1601 to 1970. */
    return (double)(filetime_u64(ft) - 116444736000000000ull) * 1e-7;
}

/* One pid space per machine (a Windows container has its own pids and its
 * own object names too), and a table's Local\ name is visible only inside
 * its session: every table this process can open shares its pids. 0 is
 * "unknown" to the segment code, which then trusts the pids. */
uint64_t
mt_os_pid_namespace(void)
{
    return 0;
}

int
mt_os_random(void *buf, size_t n, mt_oserr *e)
{
    while (n > 0) {
        ULONG chunk = n > 0x40000000u ? 0x40000000u : (ULONG)n;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, buf, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG))) {
            return mt_fail(e, "BCryptGenRandom", NULL, EIO);
        }
        buf = (char *)buf + chunk;
        n -= chunk;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Shared segments: named file mappings backed by the page file.           */

/*
 * A segment "/memtrack-<hex>" is the section "Local\memtrack-<hex>" (this
 * session's namespace). Its DACL grants access to this process's user and
 * nobody else (the 0600 of the POSIX segment). The "descriptors" of the
 * interface are section handles (see mt_os_pidfd_open for handles in ints).
 *
 * Differences from POSIX shm, handled here:
 *  - a section has no exact size to ask for (a view is rounded up to whole
 *    pages), so the section starts with one page that records the size the
 *    creator asked for; callers see the bytes after it, and offsets and
 *    sizes are those of the caller's bytes;
 *  - a name lives while any process holds a handle to the section, and
 *    cannot be unlinked: each view keeps a handle of its own (the list
 *    below), closed on detach or unlink, so the name stays while any
 *    process maps the segment and goes with the last one: no stale segment
 *    can outlive its processes, as one can in /dev/shm;
 *  - there are no uids nor modes: mt_os_fd_info reads them from the DACL
 *    (see there);
 *  - a section cannot shrink under its views, so there is no SIGBUS to
 *    guard against.
 */
#define SEG_PREFIX 4096u
#define SEG_MAGIC "MTSEGWIN"

typedef struct {
    char magic[8];
    uint64_t size; /* the size asked for, without this prefix */
} seg_prefix;

typedef struct mapping {
    struct mapping *next;
    char *base; /* the view: the prefix page, then the caller's bytes */
    HANDLE section;
    char name[256];
} mapping;

/* Every view this process has mapped. Protected by maps_lock. */
static SRWLOCK maps_lock = SRWLOCK_INIT;
static mapping *maps;

static HANDLE
handle_of(int fd)
{
    return LongToHandle(fd);
}

static int
fd_of(HANDLE h)
{
    return (int)HandleToLong(h);
}

/* "/memtrack-x" -> L"Local\\memtrack-x"; 0, or -1 for a bad name. */
static int
section_name(const char *name, wchar_t *out, size_t out_len)
{
    static const wchar_t prefix[] = L"Local\\";
    size_t plen = sizeof prefix / sizeof prefix[0] - 1;
    if (name[0] != '/' || name[1] == '\0' || strchr(name + 1, '/') != NULL ||
        strchr(name, '\\') != NULL || strlen(name) >= 200) {
        return -1;
    }
    memcpy(out, prefix, plen * sizeof(wchar_t));
    int n = MultiByteToWideChar(CP_UTF8, MB_ERR_INVALID_CHARS, name + 1, -1, out + plen,
                                (int)(out_len - plen));
    return n > 0 ? 0 : -1;
}

/* Keep a handle of its own next to the view at base (see above). */
static int
remember(char *base, HANDLE section, const char *name)
{
    HANDLE own = NULL;
    mapping *m = malloc(sizeof *m);
    if (m == NULL || !DuplicateHandle(GetCurrentProcess(), section, GetCurrentProcess(), &own, 0,
                                      FALSE, DUPLICATE_SAME_ACCESS)) {
        free(m);
        return -1;
    }
    m->base = base;
    m->section = own;
    snprintf(m->name, sizeof m->name, "%s", name ? name : "");
    AcquireSRWLockExclusive(&maps_lock);
    m->next = maps;
    maps = m;
    ReleaseSRWLockExclusive(&maps_lock);
    return 0;
}

/* The user this process runs as, in a buffer to free(). */
static TOKEN_USER *
token_user(mt_oserr *e)
{
    HANDLE token = NULL;
    DWORD len = 0;
    TOKEN_USER *user = NULL;
    if (!OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &token)) {
        win_fail(e, "OpenProcessToken", NULL);
        goto done;
    }
    GetTokenInformation(token, TokenUser, NULL, 0, &len);
    user = len ? malloc(len) : NULL;
    if (user == NULL || !GetTokenInformation(token, TokenUser, user, len, &len)) {
        win_fail(e, "GetTokenInformation", NULL);
        free(user);
        user = NULL;
    }
done:
    if (token != NULL) {
        CloseHandle(token);
    }
    return user;
}

/* A DACL with one entry: full access for the user this process runs as.
 * *buffer holds it (free() it after the section is created). */
static int
owner_only(SECURITY_ATTRIBUTES *sa, SECURITY_DESCRIPTOR *sd, void **buffer, mt_oserr *e)
{
    TOKEN_USER *user = token_user(e);
    int rc = -1;
    *buffer = NULL;
    if (user == NULL) {
        goto done;
    }
    PSID sid = user->User.Sid;
    DWORD acl_len =
        (DWORD)(sizeof(ACL) + sizeof(ACCESS_ALLOWED_ACE) - sizeof(DWORD) + GetLengthSid(sid));
    ACL *acl = malloc(acl_len);
    if (acl == NULL) {
        mt_fail(e, "malloc", NULL, ENOMEM);
        goto done;
    }
    if (!InitializeAcl(acl, acl_len, ACL_REVISION) ||
        !AddAccessAllowedAce(acl, ACL_REVISION, FILE_MAP_ALL_ACCESS, sid) ||
        !InitializeSecurityDescriptor(sd, SECURITY_DESCRIPTOR_REVISION) ||
        !SetSecurityDescriptorDacl(sd, TRUE, acl, FALSE)) {
        win_fail(e, "SetSecurityDescriptorDacl", NULL);
        free(acl);
        goto done;
    }
    sa->nLength = sizeof *sa;
    sa->lpSecurityDescriptor = sd;
    sa->bInheritHandle = FALSE;
    *buffer = acl;
    rc = 0;
done:
    free(user);
    return rc;
}

int
mt_os_shm_create(const char *name, size_t size, void **addr, int *fd, mt_oserr *e)
{
    wchar_t wname[256];
    SECURITY_ATTRIBUTES sa;
    SECURITY_DESCRIPTOR sd;
    void *acl_buffer = NULL;
    HANDLE section = NULL;
    char *base = NULL;
    int rc = -1;
    if (section_name(name, wname, sizeof wname / sizeof wname[0]) < 0) {
        mt_fail(e, "CreateFileMapping", name, EINVAL);
        goto done;
    }
    if (size > (size_t)-1 - SEG_PREFIX) {
        mt_fail(e, "CreateFileMapping", name, ENOMEM);
        goto done;
    }
    if (owner_only(&sa, &sd, &acl_buffer, e) < 0) {
        goto done;
    }
    uint64_t total = (uint64_t)size + SEG_PREFIX;
    section = CreateFileMappingW(INVALID_HANDLE_VALUE, &sa, PAGE_READWRITE, (DWORD)(total >> 32),
                                 (DWORD)total, wname);
    if (section == NULL) {
        win_fail(e, "CreateFileMapping", name);
        goto done;
    }
    if (GetLastError() == ERROR_ALREADY_EXISTS) { /* O_EXCL */
        CloseHandle(section);
        section = NULL;
        mt_fail(e, "CreateFileMapping", name, EEXIST);
        goto done;
    }
    base = MapViewOfFile(section, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, 0);
    if (base == NULL) {
        win_fail(e, "MapViewOfFile", name);
        goto done;
    }
    seg_prefix *p = (seg_prefix *)base;
    memcpy(p->magic, SEG_MAGIC, sizeof p->magic);
    p->size = size;
    if (remember(base, section, name) < 0) {
        win_fail(e, "DuplicateHandle", name);
        goto done;
    }
    *addr = base + SEG_PREFIX;
    base = NULL;
    if (fd != NULL) {
        *fd = fd_of(section);
        section = NULL;
    }
    rc = 0;
done:
    if (base != NULL) {
        UnmapViewOfFile(base);
    }
    if (section != NULL) {
        CloseHandle(section);
    }
    free(acl_buffer);
    return rc;
}

/* The size the creator recorded in the section's first page; 0 when the
 * section has no such page (not written yet, or not a memtrack segment). */
static uint64_t
recorded_size(HANDLE section)
{
    MEMORY_BASIC_INFORMATION info;
    uint64_t size = 0;
    const char *base = MapViewOfFile(section, FILE_MAP_READ, 0, 0, 0);
    if (base == NULL) {
        return 0;
    }
    const seg_prefix *p = (const seg_prefix *)base;
    if (VirtualQuery(base, &info, sizeof info) == sizeof info && info.RegionSize >= SEG_PREFIX &&
        memcmp(p->magic, SEG_MAGIC, sizeof p->magic) == 0 &&
        p->size <= (uint64_t)info.RegionSize - SEG_PREFIX) {
        size = p->size;
    }
    UnmapViewOfFile(base);
    return size;
}

/* Windows has no uid and mode: they are read from the DACL, in the terms
 * the table's checks use. uid: the relative id (last sub-authority) of the
 * one user the DACL admits (a different SID with the same relative id as
 * ours reads as UINT32_MAX, never as us); mode 0600 when that user is all
 * the DACL admits, 0666 when it admits more, or everyone (no DACL).
 * regular: a section that carries memtrack's size page. */
int
mt_os_fd_info(int fd, mt_file_info *info)
{
    PACL dacl = NULL;
    PSECURITY_DESCRIPTOR sd = NULL;
    TOKEN_USER *me = NULL;
    mt_oserr ignored;
    HANDLE h = handle_of(fd);
    int rc = -1;
    memset(info, 0, sizeof *info);
    info->uid = UINT32_MAX;
    if (GetSecurityInfo(h, SE_KERNEL_OBJECT, DACL_SECURITY_INFORMATION, NULL, NULL, &dacl, NULL,
                        &sd) != ERROR_SUCCESS) {
        goto done;
    }
    me = token_user(&ignored);
    if (me == NULL) {
        goto done;
    }
    info->mode = 0666;
    ACCESS_ALLOWED_ACE *ace = NULL;
    if (dacl != NULL && dacl->AceCount >= 1 && GetAce(dacl, 0, (void **)&ace) &&
        ace->Header.AceType == ACCESS_ALLOWED_ACE_TYPE) {
        PSID sid = (PSID)&ace->SidStart;
        UCHAR subs = *GetSidSubAuthorityCount(sid);
        DWORD rid = subs ? *GetSidSubAuthority(sid, subs - 1u) : UINT32_MAX;
        int mine = EqualSid(sid, me->User.Sid);
        info->uid = mine ? mt_os_uid() : (rid == mt_os_uid() ? UINT32_MAX : rid);
        if (dacl->AceCount == 1) {
            info->mode = 0600;
        }
    }
    info->size = recorded_size(h);
    info->regular = info->size > 0;
    rc = 0;
done:
    free(me);
    if (sd != NULL) {
        LocalFree(sd);
    }
    return rc;
}

/* Named sections cannot be listed through the Win32 API (only through the
 * NT object directory): no table can be found without its name (memtrack
 * top then asks for the NAME). */
int
mt_os_shm_list(const char *prefix, mt_os_shm_fn fn, void *ctx, mt_oserr *e)
{
    (void)prefix;
    (void)fn;
    (void)ctx;
    return mt_fail(e, "listing sections", NULL, ENOSYS);
}

/* A section exists while any process holds a handle to it. */
int
mt_os_shm_exists(const char *name)
{
    wchar_t wname[256];
    if (section_name(name, wname, sizeof wname / sizeof wname[0]) < 0) {
        return 0;
    }
    HANDLE h = OpenFileMappingW(FILE_MAP_READ, FALSE, wname);
    int found = h != NULL || GetLastError() == ERROR_ACCESS_DENIED;
    if (h != NULL) {
        CloseHandle(h);
    }
    return found;
}

int
mt_os_shm_open(const char *name, int *fd, mt_file_info *info, mt_oserr *e)
{
    wchar_t wname[256];
    if (section_name(name, wname, sizeof wname / sizeof wname[0]) < 0) {
        return mt_fail(e, "OpenFileMapping", name, ENOENT);
    }
    HANDLE h = OpenFileMappingW(FILE_MAP_READ | FILE_MAP_WRITE | READ_CONTROL, FALSE, wname);
    if (h == NULL) {
        return win_fail(e, "OpenFileMapping", name);
    }
    if (mt_os_fd_info(fd_of(h), info) < 0) {
        int rc = win_fail(e, "GetSecurityInfo", name);
        CloseHandle(h);
        return rc;
    }
    *fd = fd_of(h);
    return 0;
}

int
mt_os_shm_map(int fd, size_t size, void **addr, const char *name, mt_oserr *e)
{
    HANDLE h = handle_of(fd);
    if (size > (size_t)-1 - SEG_PREFIX) {
        return mt_fail(e, "MapViewOfFile", name, ENOMEM);
    }
    char *base = MapViewOfFile(h, FILE_MAP_READ | FILE_MAP_WRITE, 0, 0, size + SEG_PREFIX);
    if (base == NULL) {
        return win_fail(e, "MapViewOfFile", name);
    }
    if (remember(base, h, name) < 0) {
        int rc = win_fail(e, "DuplicateHandle", name);
        UnmapViewOfFile(base);
        return rc;
    }
    *addr = base + SEG_PREFIX;
    return 0;
}

/* The caller's bytes [offset, offset + n), through a view of its own. */
long
mt_os_pread(int fd, void *buf, size_t n, uint64_t offset)
{
    HANDLE h = handle_of(fd);
    uint64_t size = recorded_size(h);
    if (size == 0 && offset == 0) {
        return 0;
    }
    if (offset >= size || n == 0) {
        return 0;
    }
    if (n > size - offset) {
        n = (size_t)(size - offset);
    }
    const char *base = MapViewOfFile(h, FILE_MAP_READ, 0, 0, (SIZE_T)(SEG_PREFIX + offset + n));
    if (base == NULL) {
        return -1;
    }
    memcpy(buf, base + SEG_PREFIX + offset, n);
    UnmapViewOfFile(base);
    return (long)n;
}

void
mt_os_shm_detach(void *addr, size_t size)
{
    (void)size;
    if (addr == NULL) {
        return;
    }
    char *base = (char *)addr - SEG_PREFIX;
    mapping *found = NULL;
    AcquireSRWLockExclusive(&maps_lock);
    for (mapping **m = &maps; *m != NULL; m = &(*m)->next) {
        if ((*m)->base == base) {
            found = *m;
            *m = found->next;
            break;
        }
    }
    ReleaseSRWLockExclusive(&maps_lock);
    UnmapViewOfFile(base);
    if (found != NULL) {
        if (found->section != NULL) {
            CloseHandle(found->section);
        }
        free(found);
    }
}

/* The name cannot be removed while another process holds the section:
 * close the handles this process keeps for its views of it (the views
 * stay valid), so that the name goes when the other users close theirs.
 * A descriptor from mt_os_shm_create/open is the caller's to close. */
int
mt_os_shm_unlink(const char *name, mt_oserr *e)
{
    (void)e;
    AcquireSRWLockExclusive(&maps_lock);
    for (mapping *m = maps; m != NULL; m = m->next) {
        if (m->section != NULL && strcmp(m->name, name) == 0) {
            CloseHandle(m->section);
            m->section = NULL;
        }
    }
    ReleaseSRWLockExclusive(&maps_lock);
    return 0;
}

/* The relative id of the user this process runs as: Windows's uid as far
 * as the table's checks go (see mt_os_fd_info). Cached after the first
 * call; a race only computes it twice. */
uint32_t
mt_os_uid(void)
{
    static volatile LONG cached = -1;
    LONG uid = cached;
    if (uid == -1) {
        mt_oserr ignored;
        TOKEN_USER *me = token_user(&ignored);
        uid = 0;
        if (me != NULL) {
            UCHAR subs = *GetSidSubAuthorityCount(me->User.Sid);
            uid = subs ? (LONG)*GetSidSubAuthority(me->User.Sid, subs - 1u) : 0;
            free(me);
        }
        InterlockedExchange(&cached, uid);
    }
    return (uint32_t)uid;
}

/* RAM plus page files (the commit limit), rounded up to a power of two. */
uint64_t
mt_os_memory_bound(void)
{
    MEMORYSTATUSEX ms;
    ms.dwLength = sizeof ms;
    if (!GlobalMemoryStatusEx(&ms)) {
        return 0;
    }
    uint64_t total = ms.ullTotalPageFile > ms.ullTotalPhys ? ms.ullTotalPageFile : ms.ullTotalPhys;
    uint64_t bound = 1u << 20;
    while (bound < total && bound < (UINT64_C(1) << 62)) {
        bound <<= 1;
    }
    return bound;
}

/* A page-file section cannot shrink under its views: nothing to guard. */
int
mt_os_guarded(void (*fn)(void *), void *arg)
{
    fn(arg);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Other processes: identity, liveness, memory, the process tree.           */

/* A process object outlives its exit while any handle to it is open (its
 * parent's, a watcher's): that is Windows's zombie, and its pid cannot be
 * reused until the last handle closes. The identity is the creation time
 * (FILETIME, 100 ns since 1601), which a later process with the same pid
 * cannot share. */
int
mt_os_proc_identity(long pid, uint64_t *start_time)
{
    FILETIME created, exited, kernel, user;
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, (DWORD)pid);
    int state = MT_PROC_GONE;
    if (h == NULL) {
        goto done;
    }
    if (!GetProcessTimes(h, &created, &exited, &kernel, &user)) {
        goto done;
    }
    *start_time = filetime_u64(created);
    state = WaitForSingleObject(h, 0) == WAIT_TIMEOUT ? MT_PROC_ALIVE : MT_PROC_ZOMBIE;
done:
    if (h != NULL) {
        CloseHandle(h);
    }
    return state;
}

/* Running (or there but not ours to open), as kill(pid, 0) with EPERM. An
 * exited process whose object is still held open does not exist here. */
int
mt_os_pid_exists(long pid)
{
    HANDLE h = OpenProcess(SYNCHRONIZE, FALSE, (DWORD)pid);
    if (h == NULL) {
        return GetLastError() == ERROR_ACCESS_DENIED;
    }
    int running = WaitForSingleObject(h, 0) == WAIT_TIMEOUT;
    CloseHandle(h);
    return running;
}

/* The exit code of an exited process whose object is still held open (a
 * pool holds a handle to each of its workers). Windows has no signals: a
 * process killed by TerminateProcess exits with the code its killer chose
 * (multiprocessing uses 0x10000), reported as an exit code. 1 when known. */
int
mt_os_child_status(long pid, int *exit_code, int *exit_signal)
{
    DWORD code = 0;
    int known = 0;
    (void)exit_signal;
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, (DWORD)pid);
    if (h == NULL) {
        return 0;
    }
    if (WaitForSingleObject(h, 0) == WAIT_OBJECT_0 && GetExitCodeProcess(h, &code)) {
        *exit_code = (int)code;
        known = 1;
    }
    CloseHandle(h);
    return known;
}

int
mt_os_footprint_of(long pid, mt_footprint *fp, mt_oserr *e)
{
    HANDLE h = OpenProcess(PROCESS_QUERY_INFORMATION | PROCESS_VM_READ, FALSE, (DWORD)pid);
    if (h == NULL) {
        return win_fail(e, "OpenProcess", NULL);
    }
    int rc = working_set_footprint(h, fp, e);
    CloseHandle(h);
    return rc;
}

int
mt_os_proc_memory(long pid, uint64_t *rss, uint64_t *hwm, uint64_t *anon)
{
    PROCESS_MEMORY_COUNTERS_EX c;
    *anon = 0; /* the working set is not split by kind here */
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION | SYNCHRONIZE, FALSE, (DWORD)pid);
    int rc = -1;
    if (h == NULL) {
        return -1;
    }
    /* An exited process keeps its counters while held open: report none,
     * as Linux has no memory for a zombie. */
    if (WaitForSingleObject(h, 0) == WAIT_TIMEOUT && counters_of(h, &c) == 0) {
        *rss = (uint64_t)c.WorkingSetSize;
        *hwm = (uint64_t)c.PeakWorkingSetSize;
        rc = 0;
    }
    CloseHandle(h);
    return rc;
}

static int
creation_time(DWORD pid, uint64_t *t)
{
    FILETIME created, exited, kernel, user;
    HANDLE h = OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, FALSE, pid);
    int ok = h != NULL && GetProcessTimes(h, &created, &exited, &kernel, &user);
    if (ok) {
        *t = filetime_u64(created);
    }
    if (h != NULL) {
        CloseHandle(h);
    }
    return ok ? 0 : -1;
}

/* Windows records a parent's pid at creation and never updates it: after
 * the parent exits, its pid can be reused and the new owner "adopts" the
 * old children. A child created before its supposed parent is not its. */
int
mt_os_children(long pid, long *out, size_t *n, size_t max)
{
    PROCESSENTRY32W entry;
    uint64_t parent_start = 0, child_start;
    if (creation_time((DWORD)pid, &parent_start) < 0) {
        return -1;
    }
    HANDLE snap = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
    if (snap == INVALID_HANDLE_VALUE) {
        return -1;
    }
    entry.dwSize = sizeof entry;
    for (BOOL more = Process32FirstW(snap, &entry); more && *n < max;
         more = Process32NextW(snap, &entry)) {
        if (entry.th32ParentProcessID != (DWORD)pid || entry.th32ProcessID == (DWORD)pid) {
            continue;
        }
        if (creation_time(entry.th32ProcessID, &child_start) == 0 && child_start >= parent_start) {
            out[(*n)++] = (long)entry.th32ProcessID;
        }
    }
    CloseHandle(snap);
    return 0;
}

int
mt_os_proc_parent(long pid, long *ppid)
{
    PROCESSENTRY32W entry;
    int rc = -1;
    HANDLE snap = CreateToolhelp32Snapshot(TH32CS_SNAPPROCESS, 0);
    if (snap == INVALID_HANDLE_VALUE) {
        return -1;
    }
    entry.dwSize = sizeof entry;
    for (BOOL more = Process32FirstW(snap, &entry); more; more = Process32NextW(snap, &entry)) {
        if (entry.th32ProcessID == (DWORD)pid) {
            *ppid = (long)entry.th32ParentProcessID;
            rc = 0;
            break;
        }
    }
    CloseHandle(snap);
    return rc;
}

/* What a process runs, what it listens on, a zombie's status and the OOM
 * killer's counters are Linux's (/proc, cgroups): Windows has no zombies and
 * no OOM killer, and another process's command line is in its PEB, which this
 * port does not read. The recorder then decides roles from the parent
 * relation alone (docs/report.md, "Roles"). */
long
mt_os_proc_cmdline(long pid, char *buf, size_t size)
{
    (void)pid;
    if (size > 0) {
        buf[0] = '\0';
    }
    return -1;
}

int
mt_os_proc_listens(long pid, long parent)
{
    (void)pid;
    (void)parent;
    return -1;
}

int
mt_os_proc_exit_status(long pid, int *exit_code, int *exit_signal)
{
    (void)pid;
    (void)exit_code;
    (void)exit_signal;
    return 0;
}

int
mt_os_oom_counter_file(long pid, char *file, size_t size)
{
    (void)pid;
    if (size > 0) {
        file[0] = '\0';
    }
    return -1;
}

int64_t
mt_os_oom_kills(const char *file)
{
    (void)file;
    return -1;
}

/* The UCRT calls its "invalid parameter" handler for a bad descriptor,
 * and the default one ends the process: as CPython does around its own
 * calls, set a handler that lets _write() return EBADF instead (the old
 * msvcrt that mingw-w64 links returns EBADF by itself, as the C tests
 * check). The MSVC branch has not been compiled: nothing here runs MSVC. */
#ifdef _MSC_VER
static void __cdecl
ignore_invalid_parameter(const wchar_t *expr, const wchar_t *func, const wchar_t *file,
                         unsigned line, uintptr_t reserved)
{
    (void)expr;
    (void)func;
    (void)file;
    (void)line;
    (void)reserved;
}
#define SUPPRESS_IPH_BEGIN                                                                      \
    _invalid_parameter_handler old_iph =                                                        \
        _set_thread_local_invalid_parameter_handler(ignore_invalid_parameter);
#define SUPPRESS_IPH_END _set_thread_local_invalid_parameter_handler(old_iph);
#else
#define SUPPRESS_IPH_BEGIN
#define SUPPRESS_IPH_END
#endif

/* fd is a C runtime descriptor: the extension must use the CRT of the
 * Python that opened it (the UCRT for CPython 3.5+). */
int
mt_os_write_all(int fd, const char *buf, size_t len, mt_oserr *e)
{
    int rc = 0;
    SUPPRESS_IPH_BEGIN
    while (len > 0) {
        unsigned chunk = len > 0x40000000u ? 0x40000000u : (unsigned)len;
        int w = _write(fd, buf, chunk);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            rc = mt_fail(e, "write", NULL, errno);
            break;
        }
        buf += w;
        len -= (size_t)w;
    }
    SUPPRESS_IPH_END
    return rc;
}

/* The pidfd of Windows is a process handle: it names one process object,
 * whose pid is not reused while the handle is open. Kernel handles have 32
 * significant bits (so that 32- and 64-bit processes can share them), so an
 * int holds one; LongToHandle sign-extends it back. -1 when the process is
 * gone or not ours to open. */
int
mt_os_pidfd_open(long pid)
{
    HANDLE h = OpenProcess(SYNCHRONIZE | PROCESS_QUERY_LIMITED_INFORMATION, FALSE, (DWORD)pid);
    return h == NULL ? -1 : (int)HandleToLong(h);
}

int
mt_os_pidfd_alive(int fd)
{
    return WaitForSingleObject(LongToHandle(fd), 0) == WAIT_TIMEOUT;
}

/*
 * The epoll set of Windows: an event handle (so that mt_os_close() can tell
 * it, and an int holds it) that names a list of (process handle, key) kept
 * here. A process handle is signalled once its process has exited and
 * stays so, as a pidfd stays readable: mt_os_epoll_ready() asks each with a
 * zero wait (WaitForMultipleObjects would name only the first of at most
 * 64), a check in user mode for a handle not yet signalled.
 */
typedef struct watch_set {
    struct watch_set *next;
    HANDLE id; /* the event handle standing for the set */
    size_t n, cap;
    HANDLE *handles;
    uint64_t *keys;
} watch_set;

/* Every set of this process. Protected by sets_lock (one reader at a time
 * uses a set, under the GIL; the lock guards the list). */
static SRWLOCK sets_lock = SRWLOCK_INIT;
static watch_set *sets;

static watch_set *
find_set(int ep)
{
    HANDLE id = handle_of(ep);
    watch_set *s;
    AcquireSRWLockShared(&sets_lock);
    for (s = sets; s != NULL && s->id != id; s = s->next) {
    }
    ReleaseSRWLockShared(&sets_lock);
    return s;
}

int
mt_os_epoll_new(void)
{
    watch_set *s = calloc(1, sizeof *s);
    if (s == NULL) {
        return -1;
    }
    s->id = CreateEventW(NULL, TRUE, FALSE, NULL);
    if (s->id == NULL) {
        free(s);
        return -1;
    }
    AcquireSRWLockExclusive(&sets_lock);
    s->next = sets;
    sets = s;
    ReleaseSRWLockExclusive(&sets_lock);
    return fd_of(s->id);
}

int
mt_os_epoll_add(int ep, int fd, uint64_t key)
{
    watch_set *s = find_set(ep);
    if (s == NULL || fd < 0) {
        return -1;
    }
    if (s->n == s->cap) {
        size_t cap = s->cap ? 2 * s->cap : 16;
        HANDLE *handles = realloc(s->handles, cap * sizeof *handles);
        if (handles == NULL) {
            return -1;
        }
        s->handles = handles;
        uint64_t *keys = realloc(s->keys, cap * sizeof *keys);
        if (keys == NULL) {
            return -1;
        }
        s->keys = keys;
        s->cap = cap;
    }
    s->handles[s->n] = handle_of(fd);
    s->keys[s->n] = key;
    s->n++;
    return 0;
}

void
mt_os_epoll_del(int ep, int fd)
{
    watch_set *s = find_set(ep);
    for (size_t i = 0; s != NULL && i < s->n; i++) {
        if (s->handles[i] == handle_of(fd)) {
            s->n--;
            s->handles[i] = s->handles[s->n];
            s->keys[i] = s->keys[s->n];
            break;
        }
    }
}

int
mt_os_epoll_ready(int ep, uint64_t *keys, int max)
{
    watch_set *s = find_set(ep);
    int found = 0;
    if (s == NULL) {
        return -1;
    }
    for (size_t i = 0; i < s->n && found < max; i++) {
        if (WaitForSingleObject(s->handles[i], 0) == WAIT_OBJECT_0) {
            keys[found++] = s->keys[i];
        }
    }
    return found;
}

/* Whatever an mt_os_* function returned as a descriptor: a process or
 * section handle, or a watch set. */
void
mt_os_close(int fd)
{
    if (fd < 0) {
        return;
    }
    HANDLE h = handle_of(fd);
    watch_set *found = NULL;
    AcquireSRWLockExclusive(&sets_lock);
    for (watch_set **s = &sets; *s != NULL; s = &(*s)->next) {
        if ((*s)->id == h) {
            found = *s;
            *s = found->next;
            break;
        }
    }
    ReleaseSRWLockExclusive(&sets_lock);
    if (found != NULL) { /* the process handles are the caller's */
        free(found->handles);
        free(found->keys);
        free(found);
    }
    CloseHandle(h);
}
