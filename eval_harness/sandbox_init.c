/* codegeex-sandbox: runs one untrusted program so that nothing of it outlives the run and it sees almost nothing of
 * the host.  Built once per machine by eval_harness/sandbox.py (gcc -O2), run as root.
 *
 *   codegeex-sandbox -p PPID -u UID -r ROOT -w WORK -f REQ,REP,REPORT [-b PATH]... [-l RES=N]... [-s SIZE] [-R]
 *                    -- CMD...
 * (-R: the program keeps root inside the namespaces; only for the harness's own warm interpreter.)
 *
 * Three processes:
 *   helper   (this process, in the harness's namespaces): parent-death signal SIGTERM, so it tears the run down when
 *            the harness dies however it dies; SIGTERM/SIGINT/SIGHUP kill the run's init and wait for it, which
 *            returns only once every process of the run is gone; then it writes the report and exits.
 *   init     (PID 1 of new PID, mount, network, IPC and UTS namespaces): builds the root file system (a private tmpfs
 *            holding read-only binds of the toolchains, the work directory bound read-write, private tmpfs for /tmp,
 *            /var/tmp, /run and /dev/shm, a minimal /dev, its own /proc), pivots into it, starts the program and
 *            reaps.  Its parent-death signal is SIGKILL.  When the program's first process exits, init reports its
 *            status and exits: the kernel then kills every process left in the namespace (setsid, double forks and
 *            changed process groups included: they cannot leave a PID namespace).
 *   program  in a new session, under rlimits, as UID (no groups), no new privileges, fds 0-4 only (3: requests to
 *            the harness, 4: its replies; see sandbox.py), in WORK.
 * The report (fd REPORT, which only the helper holds) is one line: "exit <wait status>", "killed" or
 * "error <what failed>".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAX_BINDS 64
#define MAX_LIMITS 8
#define REQ_FD 3
#define REP_FD 4
#define REPORT_FD 5

static const char *root, *work, *tmpfs_size = "64m";
static const char *binds[MAX_BINDS];
static int nbinds;
static struct { int resource; rlim_t value; } limits[MAX_LIMITS];
static int nlimits;
static uid_t uid;
static int as_root;  /* -R: the harness's own warm interpreter (eval_harness/zygote.py), which drops per program */
static volatile pid_t init_pid;
static int status_pipe[2];

static void report(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = sizeof line - 2;
    line[n++] = '\n';
    if (write(REPORT_FD, line, n) < 0) _exit(124);
}

/* In init: tell the helper what failed (it reports it), then stop. */
static void fail(const char *what, const char *path) {
    char msg[400];
    int n = snprintf(msg, sizeof msg, "E%s %s: %s", what, path ? path : "", strerror(errno));
    if (n > 0 && write(status_pipe[1], msg, n > (int)sizeof msg ? (int)sizeof msg : n) < 0) _exit(123);
    _exit(122);
}

static void mkdirs(const char *path) {
    char buf[PATH_MAX];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(buf, 0755) && errno != EEXIST) fail("mkdir", buf);
        *p = '/';
    }
    if (mkdir(buf, 0755) && errno != EEXIST) fail("mkdir", buf);
}

static void at_root(char *out, const char *path) { snprintf(out, PATH_MAX, "%s%s", root, path); }

/* Bind host ``path`` at the same place in the new root, read-only unless ``writable``. */
static void bind(const char *path, int writable) {
    char target[PATH_MAX];
    struct stat st;
    if (stat(path, &st)) return;  /* optional: a toolchain this machine lacks */
    at_root(target, path);
    if (S_ISDIR(st.st_mode)) {
        mkdirs(target);
    } else {
        char parent[PATH_MAX];
        snprintf(parent, sizeof parent, "%s", target);
        *strrchr(parent, '/') = 0;
        mkdirs(parent);
        int fd = open(target, O_CREAT | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0) fail("create", target);
        close(fd);
    }
    if (mount(path, target, NULL, MS_BIND | MS_REC, NULL)) fail("bind", path);
    unsigned long flags = MS_REMOUNT | MS_BIND | MS_NOSUID | (writable ? 0 : MS_RDONLY);
    if (!S_ISCHR(st.st_mode)) flags |= MS_NODEV;
    if (mount(NULL, target, NULL, flags, NULL)) fail("remount", path);
}

static void tmpfs(const char *path, const char *options) {
    char target[PATH_MAX];
    at_root(target, path);
    mkdirs(target);
    if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)) fail("tmpfs", path);
}

static void link_at_root(const char *path, const char *to) {
    char target[PATH_MAX];
    at_root(target, path);
    if (symlink(to, target) && errno != EEXIST) fail("symlink", target);
}

/* /bin, /lib, ... as the host has them: symlinks into /usr stay symlinks, real directories are bound read-only. */
static void top_level(const char *path) {
    char to[PATH_MAX];
    ssize_t n = readlink(path, to, sizeof to - 1);
    if (n > 0) {
        to[n] = 0;
        link_at_root(path, to);
    } else {
        bind(path, 0);
    }
}

static void build_root(void) {
    char target[PATH_MAX], old[PATH_MAX];
    static const char *devices[] = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"};
    static const char *tops[] = {"/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"};
    char scratch[64];
    snprintf(scratch, sizeof scratch, "size=%s,mode=1777", tmpfs_size);
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL)) fail("make private", "/");
    if (mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")) fail("tmpfs", root);
    for (size_t i = 0; i < sizeof tops / sizeof *tops; i++) top_level(tops[i]);
    for (int i = 0; i < nbinds; i++) bind(binds[i], 0);
    bind(work, 1);
    tmpfs("/tmp", scratch);
    tmpfs("/var/tmp", scratch);
    tmpfs("/run", "size=1m,mode=0755");
    at_root(target, "/dev");
    mkdirs(target);
    if (mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")) fail("tmpfs", "/dev");
    for (size_t i = 0; i < sizeof devices / sizeof *devices; i++) bind(devices[i], 1);
    tmpfs("/dev/shm", scratch);
    link_at_root("/dev/fd", "/proc/self/fd");
    link_at_root("/dev/stdin", "/proc/self/fd/0");
    link_at_root("/dev/stdout", "/proc/self/fd/1");
    link_at_root("/dev/stderr", "/proc/self/fd/2");
    at_root(target, "/proc");
    mkdirs(target);
    if (mount("proc", target, "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL)) fail("proc", "/proc");
    at_root(old, "/.old");
    mkdirs(old);
    if (syscall(SYS_pivot_root, root, old)) fail("pivot_root", root);
    if (chdir("/")) fail("chdir", "/");
    if (umount2("/.old", MNT_DETACH)) fail("umount", "/.old");
    if (rmdir("/.old")) fail("rmdir", "/.old");
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, NULL)) fail("read-only", "/");
    if (sethostname("sandbox", 7)) fail("sethostname", "");
}

/* The program's process: never returns. */
static void start_program(char **argv) {
    if (setsid() < 0) fail("setsid", "");
    for (int i = 0; i < nlimits; i++) {
        struct rlimit rl = {limits[i].value, limits[i].value};
        if (setrlimit(limits[i].resource, &rl)) fail("setrlimit", "");
    }
    if (!as_root && (setgroups(0, NULL) || setgid(uid) || setuid(uid))) fail("drop to uid", "");
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) fail("no_new_privs", "");
    if (chdir(work)) fail("chdir", work);
    close(status_pipe[1]);
    if (syscall(SYS_close_range, REPORT_FD, ~0U, 0)) fail("close_range", "");
    execvp(argv[0], argv);
    dprintf(2, "codegeex-sandbox: cannot run %s: %s\n", argv[0], strerror(errno));
    _exit(127);
}

/* PID 1 of the run: never returns. */
static void run_init(int alive, char **argv) {
    if (prctl(PR_SET_PDEATHSIG, SIGKILL)) _exit(121);
    struct pollfd pfd = {alive, POLLIN, 0};
    if (poll(&pfd, 1, 0) != 0) _exit(120);  /* the helper died before the death signal was armed */
    close(REPORT_FD);
    build_root();
    pid_t program = fork();
    if (program < 0) fail("fork", "");
    if (program == 0) start_program(argv);
    for (;;) {
        int status;
        pid_t pid = waitpid(-1, &status, 0);
        if (pid == program) {
            char msg[32];
            int n = snprintf(msg, sizeof msg, "S%d", status);
            if (write(status_pipe[1], msg, n) < 0) _exit(119);
            _exit(0);  /* the kernel kills whatever the program left in the namespace */
        }
        if (pid < 0 && errno != EINTR) _exit(118);
    }
}

static volatile sig_atomic_t stop_asked;

static void on_signal(int sig) {
    (void)sig;
    stop_asked = 1;  /* before PID 1 exists: main kills it the moment it does */
    if (init_pid > 0) kill(init_pid, SIGKILL);
}

static int resource_of(const char *name) {
    static const struct { const char *name; int resource; } names[] = {
        {"cpu", RLIMIT_CPU}, {"as", RLIMIT_AS}, {"fsize", RLIMIT_FSIZE}, {"nproc", RLIMIT_NPROC},
        {"core", RLIMIT_CORE}, {"nofile", RLIMIT_NOFILE}};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (!strcmp(name, names[i].name)) return names[i].resource;
    return -1;
}

/* Move the three descriptors the harness passed to 3, 4 and 5 (whatever numbers they had). */
static int place_fds(const char *spec) {
    int src[3], tmp[3];
    if (sscanf(spec, "%d,%d,%d", &src[0], &src[1], &src[2]) != 3) return -1;
    for (int i = 0; i < 3; i++)
        if ((tmp[i] = fcntl(src[i], F_DUPFD_CLOEXEC, 10)) < 0) return -1;
    for (int i = 0; i < 3; i++) close(src[i]);
    for (int i = 0; i < 3; i++) {
        if (dup2(tmp[i], REQ_FD + i) < 0) return -1;
        close(tmp[i]);
    }
    return 0;
}

static int parse(int argc, char **argv, pid_t *ppid) {
    int opt;
    while ((opt = getopt(argc, argv, "+p:u:r:w:f:b:l:s:R")) != -1) {
        switch (opt) {
        case 'R': as_root = 1; break;
        case 'p': *ppid = (pid_t)atoi(optarg); break;
        case 'u': uid = (uid_t)strtoul(optarg, NULL, 10); break;
        case 'r': root = optarg; break;
        case 'w': work = optarg; break;
        case 'f': if (place_fds(optarg)) return -1; break;
        case 'b': if (nbinds == MAX_BINDS) return -1; binds[nbinds++] = optarg; break;
        case 's': tmpfs_size = optarg; break;
        case 'l': {
            char *eq = strchr(optarg, '=');
            if (!eq || nlimits == MAX_LIMITS) return -1;
            *eq = 0;
            if ((limits[nlimits].resource = resource_of(optarg)) < 0) return -1;
            limits[nlimits++].value = (rlim_t)strtoull(eq + 1, NULL, 10);
            break;
        }
        default: return -1;
        }
    }
    return (root && work && (uid || as_root) && optind < argc) ? optind : -1;
}

int main(int argc, char **argv) {
    pid_t ppid = 0;
    int first = parse(argc, argv, &ppid);
    if (first < 0) {
        fprintf(stderr, "usage: codegeex-sandbox -p PPID -u UID -r ROOT -w WORK -f REQ,REP,REPORT [-b PATH]... "
                        "[-l RES=N]... [-s SIZE] -- CMD...\n");
        return 2;
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigemptyset(&sa.sa_mask);
    int stops[] = {SIGTERM, SIGINT, SIGHUP};
    for (int i = 0; i < 3; i++) sigaction(stops[i], &sa, NULL);
    if (prctl(PR_SET_PDEATHSIG, SIGTERM) || getppid() != ppid) return 3;  /* the harness is gone already */
    int alive[2];
    if (pipe2(alive, O_CLOEXEC) || pipe2(status_pipe, O_CLOEXEC)) { report("error pipe: %s", strerror(errno)); return 0; }
    if (unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS)) {
        report("error unshare: %s", strerror(errno));
        return 0;
    }
    pid_t pid = fork();
    if (pid < 0) { report("error fork: %s", strerror(errno)); return 0; }
    if (pid == 0) {
        close(alive[1]);
        close(status_pipe[0]);
        run_init(alive[0], argv + first);
    }
    init_pid = pid;
    if (stop_asked) kill(pid, SIGKILL);  /* a stop (or the harness's death) during unshare and fork */
    close(alive[0]);
    close(status_pipe[1]);
    char msg[512];
    ssize_t got = 0, n;
    while ((n = read(status_pipe[0], msg + got, sizeof msg - 1 - got)) != 0) {
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) break;
        got += n;
    }
    msg[got] = 0;
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
    if (msg[0] == 'S') report("exit %s", msg + 1);
    else if (msg[0] == 'E') report("error %s", msg + 1);
    else report("killed");
    return 0;
}
