/*
 * C-level tests of csrc/platform/windows/windows.c, without Python: built
 * with mingw-w64 and run under wine by tests/test_platform_windows.py (or
 * on Windows itself). The program runs its own child processes:
 *
 *   test_windows.exe                       all tests (the parent side)
 *   test_windows.exe child-segment NAME    attach NAME, answer, wait, exit 7
 *   test_windows.exe child-limit BYTES     expect a job limit of BYTES
 *
 * Exit status 0 when every check passed; each failed check prints its line.
 */
#include "../../platform.h"

#include <windows.h>

#include <aclapi.h>
#include <errno.h>
#include <fcntl.h>
#include <io.h>
#include <psapi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures;

#define CHECK(cond)                                                                             \
    do {                                                                                        \
        if (!(cond)) {                                                                          \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);            \
            failures++;                                                                         \
        }                                                                                       \
    } while (0)

#define MiB (1024u * 1024u)

/* The segment's layout in these tests: a word each side writes, then bytes
 * the parent fills with a pattern. */
typedef struct {
    volatile LONG child_attached; /* the child saw the pattern: 1, or 2 when wrong */
    volatile LONG parent_says_exit;
    uint64_t child_uss, child_shared; /* the child's own footprint, once attached */
    unsigned char pattern[];
} shared_test;

#define SEG_SIZE (8u * MiB + 123u) /* not a whole number of pages on purpose */

static void
touch(char *p, size_t n)
{
    for (size_t i = 0; i < n; i += 4096) {
        p[i] = (char)(i >> 12);
    }
}

/* ------------------------------------------------------------------------ */
/* Readings of this process.                                                */

static void
test_readings_move_when_memory_is_touched(void)
{
    mt_oserr e;
    uint64_t rss0, rss1, rss2, hwm1, hwm2;
    mt_footprint f0, f1;
    mt_sample s;
    CHECK(mt_os_rss(&rss0, &e) == 0);
    CHECK(mt_os_footprint(&f0, &e) == 0);

    size_t n = 64u * MiB;
    char *p = VirtualAlloc(NULL, n, MEM_COMMIT | MEM_RESERVE, PAGE_READWRITE);
    CHECK(p != NULL);
    touch(p, n);

    CHECK(mt_os_rss(&rss1, &e) == 0);
    CHECK(rss1 >= rss0 + 60u * MiB);
    CHECK(mt_os_hwm(&hwm1, &e) == 0);
    CHECK(hwm1 >= rss1);
    CHECK(mt_os_hwm_exact(&hwm2, &rss2, &e) == 0 && hwm2 == hwm1 && rss2 > 0);
    CHECK(mt_os_sample(&s, &e) == 0);
    CHECK(s.rss >= rss0 + 60u * MiB && s.peak_rss >= s.rss);
    CHECK(s.vms >= s.rss);
    CHECK(mt_os_footprint(&f1, &e) == 0);
    CHECK(f1.uss >= f0.uss + 60u * MiB); /* private pages, shared bit or not */
    CHECK(f1.pss >= f1.uss && f1.pss <= f1.uss + f1.shared);
    /* The footprint walks the pages GetProcessMemoryInfo counts (under wine
     * the working set also holds wine's own Linux mappings, which no
     * Windows call can see, so only the upper bound is checked). */
    CHECK(f1.uss + f1.shared <= rss1 + 4u * MiB);

    VirtualFree(p, 0, MEM_RELEASE);
    CHECK(mt_os_rss(&rss2, &e) == 0);
    CHECK(rss2 + 60u * MiB <= rss1);
    /* A peak stays. Under wine it is Linux's VmHWM, whose per-thread (or
     * per-CPU) counters may lag by 64 pages each: allow 4 MiB. */
    CHECK(mt_os_hwm(&hwm2, &e) == 0 && hwm2 + 4u * MiB >= hwm1 && hwm2 >= rss2 + 56u * MiB);
    printf("readings: rss %llu -> %llu -> %llu, peak %llu, uss %llu -> %llu, pss %llu\n",
           (unsigned long long)rss0, (unsigned long long)rss1, (unsigned long long)rss2,
           (unsigned long long)hwm2, (unsigned long long)f0.uss, (unsigned long long)f1.uss,
           (unsigned long long)f1.pss);
}

static void
test_what_the_platform_lacks_is_said(void)
{
    mt_oserr e;
    unsigned missing = mt_os_missing();
    CHECK(missing & MT_LACKS_PEAK_RESET);
    if (missing & MT_LACKS_PSS) {
        printf("note: this Windows (wine?) counts no sharers: lacks pss\n");
    }
    CHECK(mt_os_reset_hwm(&e) == -1 && e.err == ENOSYS);
    uint64_t used = 1, free_bytes = 1;
    CHECK(mt_os_heap(&used, &free_bytes) == 0 && used == 0 && free_bytes == 0);
    CHECK(missing & MT_LACKS_HEAP);
}

static void
test_clocks_random_and_small_things(void)
{
    mt_oserr e;
    CHECK(mt_os_init(&e) == 0);
    CHECK(mt_os_pid() == (long)GetCurrentProcessId());
    double t0 = mt_os_monotonic();
    mt_os_sleep(0.02);
    double t1 = mt_os_monotonic();
    CHECK(t1 - t0 >= 0.019 && t1 - t0 < 5.0);
    double wall = mt_os_wall_time();
    CHECK(wall > 1.6e9 && wall < 4.1e9); /* 2020 .. 2100 */
    unsigned char a[32] = {0}, b[32] = {0};
    CHECK(mt_os_random(a, sizeof a, &e) == 0 && mt_os_random(b, sizeof b, &e) == 0);
    CHECK(memcmp(a, b, sizeof a) != 0);
    CHECK(mt_os_register_atfork(NULL, NULL, NULL) == 0);
    mt_os_trim(); /* must not crash; its result is advisory */

    /* write_all on a C runtime descriptor, read back. */
    char path[MAX_PATH], dir[MAX_PATH], back[64] = {0};
    CHECK(GetTempPathA(sizeof dir, dir) > 0 && GetTempFileNameA(dir, "mt", 0, path) != 0);
    int fd = _open(path, _O_WRONLY | _O_TRUNC | _O_BINARY);
    CHECK(fd >= 0 && mt_os_write_all(fd, "recorded bytes", 14, &e) == 0);
    CHECK(mt_os_write_all(-1, "x", 1, &e) == -1 && e.err == EBADF);
    _close(fd);
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL && fread(back, 1, sizeof back, f) == 14 && memcmp(back, "recorded bytes", 14) == 0);
    if (f != NULL) {
        fclose(f);
    }
    DeleteFileA(path);
}

/* ------------------------------------------------------------------------ */
/* The segment and other processes.                                         */

static void
touch_flag(void *ran)
{
    *(int *)ran = 1;
}

static void
segment_name(char *out, size_t len)
{
    unsigned char r[8];
    mt_oserr e;
    CHECK(mt_os_random(r, sizeof r, &e) == 0);
    snprintf(out, len, "/memtrack-test-%02x%02x%02x%02x%02x%02x%02x%02x", r[0], r[1], r[2],
             r[3], r[4], r[5], r[6], r[7]);
}

/* The section's DACL: one entry, for this user, and nobody else. */
static void
check_owner_only(const char *name)
{
    wchar_t wname[256];
    swprintf(wname, 256, L"Local\\%hs", name + 1);
    HANDLE h = OpenFileMappingW(READ_CONTROL, FALSE, wname);
    CHECK(h != NULL);
    if (h == NULL) {
        return;
    }
    PACL dacl = NULL;
    PSECURITY_DESCRIPTOR sd = NULL;
    DWORD rc = GetSecurityInfo(h, SE_KERNEL_OBJECT, DACL_SECURITY_INFORMATION, NULL, NULL, &dacl,
                               NULL, &sd);
    CHECK(rc == ERROR_SUCCESS);
    CHECK(dacl != NULL);
    if (rc == ERROR_SUCCESS && dacl != NULL) {
        CHECK(dacl->AceCount == 1);
        ACCESS_ALLOWED_ACE *ace = NULL;
        CHECK(GetAce(dacl, 0, (void **)&ace));
        HANDLE token;
        char buf[256];
        DWORD len;
        CHECK(OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &token));
        CHECK(GetTokenInformation(token, TokenUser, buf, sizeof buf, &len));
        CloseHandle(token);
        if (ace != NULL) {
            CHECK(ace->Header.AceType == ACCESS_ALLOWED_ACE_TYPE);
            CHECK(EqualSid((PSID)&ace->SidStart, ((TOKEN_USER *)buf)->User.Sid));
            CHECK((ace->Mask & FILE_MAP_ALL_ACCESS) == FILE_MAP_ALL_ACCESS);
        }
    }
    LocalFree(sd);
    CloseHandle(h);
}

/* Attach as the table's reader does: open, check, map, close the handle. */
static int
attach(const char *name, void **addr, size_t *size, mt_oserr *e)
{
    int fd = -1;
    mt_file_info info;
    if (mt_os_shm_open(name, &fd, &info, e) < 0) {
        return -1;
    }
    int rc = -1;
    if (info.size > 0 && mt_os_shm_map(fd, (size_t)info.size, addr, name, e) == 0) {
        *size = (size_t)info.size;
        rc = 0;
    }
    mt_os_close(fd);
    return rc;
}

static HANDLE
spawn(const char *args, HANDLE job)
{
    wchar_t exe[MAX_PATH], cmd[1024];
    STARTUPINFOW si;
    PROCESS_INFORMATION pi;
    GetModuleFileNameW(NULL, exe, MAX_PATH);
    swprintf(cmd, 1024, L"\"%ls\" %hs", exe, args);
    memset(&si, 0, sizeof si);
    si.cb = sizeof si;
    if (!CreateProcessW(exe, cmd, NULL, NULL, FALSE, job ? CREATE_SUSPENDED : 0, NULL, NULL, &si,
                        &pi)) {
        fprintf(stderr, "CreateProcess failed: %lu\n", GetLastError());
        return NULL;
    }
    if (job != NULL) {
        CHECK(AssignProcessToJobObject(job, pi.hProcess));
        ResumeThread(pi.hThread);
    }
    CloseHandle(pi.hThread);
    return pi.hProcess;
}

static int
wait_for(volatile LONG *word, double seconds)
{
    double end = mt_os_monotonic() + seconds;
    while (*word == 0 && mt_os_monotonic() < end) {
        mt_os_sleep(0.005);
    }
    return *word;
}

static int
in_list(const long *pids, size_t n, long pid)
{
    for (size_t i = 0; i < n; i++) {
        if (pids[i] == pid) {
            return 1;
        }
    }
    return 0;
}

static void
test_segment_shared_with_a_second_process_and_its_liveness(void)
{
    mt_oserr e;
    char name[64], args[128];
    void *addr = NULL, *again = NULL;
    size_t size = 0;
    segment_name(name, sizeof name);

    int seg_fd = -1;
    CHECK(mt_os_shm_create(name, SEG_SIZE, &addr, &seg_fd, &e) == 0 && seg_fd >= 0);
    if (addr == NULL) {
        return;
    }
    CHECK(mt_os_shm_create(name, SEG_SIZE, &again, NULL, &e) == -1 && e.err == EEXIST);
    CHECK(mt_os_shm_create("no-slash", 4096, &again, NULL, &e) == -1 && e.err == EINVAL);
    CHECK(attach("/memtrack-test-none", &again, &size, &e) == -1 && e.err == ENOENT);
    check_owner_only(name);
    /* What the table's reader checks before it maps: this user, 0600, the
     * exact size, a header read through the descriptor. */
    mt_file_info info;
    CHECK(mt_os_fd_info(seg_fd, &info) == 0);
    CHECK(info.uid == mt_os_uid() && info.mode == 0600 && info.regular && info.size == SEG_SIZE);
    memcpy(addr, "header!!", 8);
    char head[16] = {0};
    CHECK(mt_os_pread(seg_fd, head, 8, 0) == 8 && memcmp(head, "header!!", 8) == 0);
    CHECK(mt_os_pread(seg_fd, head, 16, SEG_SIZE - 4) == 4); /* short at the end */
    CHECK(mt_os_pread(seg_fd, head, 16, SEG_SIZE) == 0);
    mt_os_close(seg_fd);
    memset(addr, 0, sizeof(shared_test));
    CHECK(mt_os_memory_bound() >= 64u * MiB);
    int ran = 0;
    CHECK(mt_os_guarded(touch_flag, &ran) == 0 && ran == 1);

    shared_test *t = addr;
    size_t pattern = SEG_SIZE - sizeof *t;
    for (size_t i = 0; i < pattern; i++) {
        t->pattern[i] = (unsigned char)(i * 7 + 3);
    }

    snprintf(args, sizeof args, "child-segment %s", name);
    HANDLE child = spawn(args, NULL);
    CHECK(child != NULL);
    if (child == NULL) {
        return;
    }
    long pid = (long)GetProcessId(child);
    CHECK(wait_for(&t->child_attached, 30.0) == 1);

    /* While the child runs. */
    uint64_t start = 0, start_again = 0, rss = 0, hwm = 0, anon = 0;
    long parent = 0;
    mt_footprint fp;
    long kids[64];
    size_t nkids = 0;
    CHECK(mt_os_proc_identity(pid, &start) == MT_PROC_ALIVE && start != 0);
    CHECK(mt_os_pid_exists(pid) == 1);
    CHECK(mt_os_proc_memory(pid, &rss, &hwm, &anon) == 0 && rss > 0 && hwm >= rss);
    CHECK(mt_os_proc_parent(pid, &parent) == 0 && parent == mt_os_pid());
    /* The child read the whole segment: those pages are in its working
     * set, and in ours, and shared between the two where the platform
     * counts sharers (see test_what_the_platform_lacks_is_said). */
    CHECK(t->child_uss + t->child_shared >= 8u * MiB);
    if (!(mt_os_missing() & MT_LACKS_PSS)) {
        CHECK(t->child_shared >= 8u * MiB);
    }
    /* Another process's footprint needs QueryWorkingSetEx on a real process
     * handle, which wine 8 refuses even for the caller itself: probe with
     * our own pid first. */
    mt_footprint mine;
    if (mt_os_footprint_of(mt_os_pid(), &mine, &e) == 0) {
        CHECK(mt_os_footprint_of(pid, &fp, &e) == 0);
        CHECK(fp.uss + fp.shared >= 8u * MiB);
        if (!(mt_os_missing() & MT_LACKS_PSS)) {
            CHECK(fp.shared >= 8u * MiB && fp.pss + 3u * MiB <= fp.uss + fp.shared);
        }
    }
    else {
        CHECK(e.err == EINVAL);
        printf("SKIPPED footprint of another process: this Windows (wine?) refuses "
               "QueryWorkingSetEx on a process handle\n");
    }
    CHECK(mt_os_children(mt_os_pid(), kids, &nkids, 64) == 0 && in_list(kids, nkids, pid));
    int fd = mt_os_pidfd_open(pid);
    CHECK(fd >= 0);
    CHECK(mt_os_pidfd_alive(fd) == 1);
    int ep = mt_os_epoll_new();
    uint64_t keys[4];
    int other = mt_os_pidfd_open(mt_os_pid()); /* a second watch that stays alive */
    CHECK(ep >= 0 && other >= 0);
    CHECK(mt_os_epoll_add(ep, fd, 7) == 0 && mt_os_epoll_add(ep, other, 8) == 0);
    CHECK(mt_os_epoll_ready(ep, keys, 4) == 0);
    int code = -1, sig = 0;
    CHECK(mt_os_child_status(pid, &code, &sig) == 0);

    /* After it exits, held open by our handles: Windows's zombie. */
    InterlockedExchange(&t->parent_says_exit, 1);
    CHECK(WaitForSingleObject(child, 30000) == WAIT_OBJECT_0);
    CHECK(mt_os_proc_identity(pid, &start_again) == MT_PROC_ZOMBIE && start_again == start);
    CHECK(mt_os_pid_exists(pid) == 0);
    CHECK(mt_os_pidfd_alive(fd) == 0);
    CHECK(mt_os_epoll_ready(ep, keys, 4) == 1 && keys[0] == 7);
    CHECK(mt_os_epoll_ready(ep, keys, 4) == 1 && keys[0] == 7); /* stays ready, as a pidfd */
    mt_os_epoll_del(ep, fd);
    CHECK(mt_os_epoll_ready(ep, keys, 4) == 0);
    mt_os_close(ep);
    mt_os_close(other);
    CHECK(mt_os_child_status(pid, &code, &sig) == 1 && code == 7 && sig == 0);
    CHECK(mt_os_proc_memory(pid, &rss, &hwm, &anon) == -1);
    mt_os_close(fd);
    CloseHandle(child);
    /* Every handle closed: the process object and its pid go (wine's
     * server lets go of it within a second). */
    double until = mt_os_monotonic() + 10.0;
    while (mt_os_proc_identity(pid, &start_again) != MT_PROC_GONE && mt_os_monotonic() < until) {
        mt_os_sleep(0.05);
    }
    CHECK(mt_os_proc_identity(pid, &start_again) == MT_PROC_GONE);

    /* The child detached; ours still holds the name. After unlink and
     * detach nobody does, and the name is gone. */
    CHECK(attach(name, &again, &size, &e) == 0 && size == SEG_SIZE);
    CHECK(again != NULL && memcmp(again, addr, SEG_SIZE) == 0);
    mt_os_shm_detach(again, size);
    CHECK(mt_os_shm_unlink(name, &e) == 0);
    mt_os_shm_detach(addr, SEG_SIZE);
    CHECK(attach(name, &again, &size, &e) == -1 && e.err == ENOENT);
}

static int
child_segment(const char *name)
{
    mt_oserr e;
    void *addr = NULL;
    size_t size = 0;
    if (attach(name, &addr, &size, &e) != 0) {
        fprintf(stderr, "child: attach %s failed: %s errno %d\n", name, e.syscall, e.err);
        return 3;
    }
    shared_test *t = addr;
    int ok = size == SEG_SIZE;
    for (size_t i = 0; ok && i < SEG_SIZE - sizeof *t; i++) {
        ok = t->pattern[i] == (unsigned char)(i * 7 + 3);
    }
    mt_footprint fp;
    if (ok && mt_os_footprint(&fp, &e) == 0) {
        t->child_uss = fp.uss;
        t->child_shared = fp.shared;
    }
    InterlockedExchange(&t->child_attached, ok ? 1 : 2);
    wait_for(&t->parent_says_exit, 60.0);
    mt_os_shm_detach(addr, size);
    return 7;
}

/* ------------------------------------------------------------------------ */
/* Job-object limits.                                                       */

static void
test_job_memory_limit_is_read_in_the_job(void)
{
    mt_oserr e;
    mt_memory_limit m;
    BOOL in_job = TRUE;
    /* The test itself runs outside any job (wine, or a plain console). */
    if (IsProcessInJob(GetCurrentProcess(), NULL, &in_job) && !in_job) {
        CHECK(mt_os_memory_limit(&m, &e) == 0);
    }
    HANDLE job = CreateJobObjectW(NULL, NULL);
    CHECK(job != NULL);
    if (job == NULL) {
        return;
    }
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION info;
    memset(&info, 0, sizeof info);
    info.BasicLimitInformation.LimitFlags =
        JOB_OBJECT_LIMIT_JOB_MEMORY | JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE;
    info.JobMemoryLimit = 768u * MiB;
    CHECK(SetInformationJobObject(job, JobObjectExtendedLimitInformation, &info, sizeof info));
    /* wine 8 accepts job limits but keeps none (it reads them back as 0):
     * there is nothing to read in the job then, and this test says so. */
    JOBOBJECT_EXTENDED_LIMIT_INFORMATION kept;
    memset(&kept, 0, sizeof kept);
    CHECK(QueryInformationJobObject(job, JobObjectExtendedLimitInformation, &kept, sizeof kept,
                                    NULL));
    if (kept.JobMemoryLimit != info.JobMemoryLimit) {
        printf("SKIPPED job memory limit: this Windows (wine?) keeps no job limits\n");
        CloseHandle(job);
        return;
    }
    char args[64];
    snprintf(args, sizeof args, "child-limit %u", 768u * MiB);
    HANDLE child = spawn(args, job);
    CHECK(child != NULL);
    if (child != NULL) {
        DWORD code = 99;
        CHECK(WaitForSingleObject(child, 30000) == WAIT_OBJECT_0);
        CHECK(GetExitCodeProcess(child, &code) && code == 0);
        CloseHandle(child);
    }
    CloseHandle(job);
}

static int
child_limit(const char *expected)
{
    mt_oserr e;
    mt_memory_limit m;
    int rc = mt_os_memory_limit(&m, &e);
    if (rc != 1) {
        fprintf(stderr, "child: mt_os_memory_limit returned %d\n", rc);
        return 1;
    }
    printf("job limit: %llu bytes, used %llu, from %s\n", (unsigned long long)m.limit,
           (unsigned long long)m.used, m.source);
    return m.limit == strtoull(expected, NULL, 10) &&
                   strcmp(m.source, "job object (job memory)") == 0
               ? 0
               : 2;
}

int
main(int argc, char **argv)
{
    mt_oserr e;
    if (mt_os_init(&e) != 0) {
        fprintf(stderr, "mt_os_init failed\n");
        return 1;
    }
    if (argc == 3 && strcmp(argv[1], "child-segment") == 0) {
        return child_segment(argv[2]);
    }
    if (argc == 3 && strcmp(argv[1], "child-limit") == 0) {
        return child_limit(argv[2]);
    }
    test_clocks_random_and_small_things();
    test_what_the_platform_lacks_is_said();
    test_readings_move_when_memory_is_touched();
    test_segment_shared_with_a_second_process_and_its_liveness();
    test_job_memory_limit_is_read_in_the_job();
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all Windows platform checks passed\n");
    return 0;
}
