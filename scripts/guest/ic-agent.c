/*
 * ic-agent: a minimal QEMU guest agent for instaclone's test guest.
 *
 * Speaks the subset of the QEMU guest agent protocol (one JSON object per
 * line on the virtio-serial port org.qemu.guest_agent.0) that instaclone
 * uses: guest-sync, guest-sync-delimited, guest-ping, guest-info,
 * guest-exec (+ input-data, capture-output, env), guest-exec-status,
 * guest-file-open/-read/-write/-seek/-flush/-close, guest-get-time,
 * guest-set-time, guest-get-host-name, guest-network-get-interfaces, with
 * the real agent's semantics (fopen modes, files created 0600, read's
 * {count, buf-b64, eof}, errors "failed to open file '...' (mode: '...'):
 * <strerror>"), so that host code written for qemu-guest-agent runs on it
 * unchanged. Built statically by scripts/build-guest.sh;
 * the real qemu-guest-agent needs glib and more than a busybox initramfs has.
 *
 * The JSON reader is deliberately small: it finds keys in the flat requests
 * the agent protocol uses; it is not a general parser.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXLINE (4 << 20)   /* a 1 MiB guest-file-write is 1.4 MB of base64 */
#define MAXJOBS 64
#define MAXARGS 4200
#define MAXFILES 64
#define HANDLE0 1000        /* guest-file handles are HANDLE0 + slot */
#define READ_MAX (16 << 20) /* largest guest-file-read count */

struct job { int pid, done, status, capture; char out[64]; };
static struct job jobs[MAXJOBS];
static int files[MAXFILES];  /* fd + 1 of each open guest-file handle, 0: free */
static FILE *port;

static const char *b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static void b64enc(const unsigned char *in, size_t n, FILE *f) {
    for (size_t i = 0; i < n; i += 3) {
        unsigned v = in[i] << 16 | (i + 1 < n ? in[i + 1] << 8 : 0) | (i + 2 < n ? in[i + 2] : 0);
        fputc(b64[v >> 18 & 63], f);
        fputc(b64[v >> 12 & 63], f);
        fputc(i + 1 < n ? b64[v >> 6 & 63] : '=', f);
        fputc(i + 2 < n ? b64[v & 63] : '=', f);
    }
}

static size_t b64dec(const char *in, size_t n, unsigned char *out) {
    static signed char val[256];
    static int ready;
    if (!ready) {  /* a table, not strchr per character: under TCG that was the cost of a write */
        memset(val, -1, sizeof val);
        for (int i = 0; i < 64; i++) val[(unsigned char)b64[i]] = (signed char)i;
        ready = 1;
    }
    size_t o = 0; unsigned v = 0; int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int d = val[(unsigned char)in[i]];
        if (d < 0) continue;
        v = v << 6 | (unsigned)d; bits += 6;
        if (bits >= 8) { bits -= 8; out[o++] = (unsigned char)(v >> bits); }
    }
    return o;
}

/* Pointer to the value after "key": in s, or NULL. */
static const char *find(const char *s, const char *key) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *p = strstr(s, pat);
    if (!p) return NULL;
    p += strlen(pat);
    while (*p == ' ' || *p == ':') p++;
    return p;
}

/* Copy a JSON string starting at p (on its opening quote) into out. */
static const char *str(const char *p, char *out, size_t max) {
    size_t o = 0;
    if (*p != '"') return NULL;
    for (p++; *p && *p != '"'; p++) {
        char c = *p;
        if (c == '\\' && p[1] == 'u' && isxdigit((unsigned char)p[2]) && isxdigit((unsigned char)p[3]) &&
            isxdigit((unsigned char)p[4]) && isxdigit((unsigned char)p[5])) {
            char hex[5] = {p[2], p[3], p[4], p[5], 0};
            unsigned u = (unsigned)strtoul(hex, NULL, 16);  /* BMP only: UTF-16 surrogates as is */
            p += 5;
            unsigned char enc[3]; size_t k = 0;
            if (u < 0x80) enc[k++] = (unsigned char)u;
            else if (u < 0x800) { enc[k++] = 0xc0 | u >> 6; enc[k++] = 0x80 | (u & 63); }
            else { enc[k++] = 0xe0 | u >> 12; enc[k++] = 0x80 | (u >> 6 & 63); enc[k++] = 0x80 | (u & 63); }
            for (size_t j = 0; j < k; j++) if (o + 1 < max) out[o++] = (char)enc[j];
            continue;
        }
        if (c == '\\' && p[1]) {
            p++;
            c = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p == 'r' ? '\r' : *p == 'b' ? '\b' : *p == 'f' ? '\f' : *p;
        }
        if (o + 1 < max) out[o++] = c;
    }
    out[o] = 0;
    return *p ? p + 1 : p;
}

static void jstr(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\') fprintf(f, "\\%c", *s);
        else if ((unsigned char)*s < 32) fprintf(f, "\\u%04x", *s);
        else fputc(*s, f);
    }
    fputc('"', f);
}

static void reply_raw(const char *json) { fprintf(port, "{\"return\": %s}\n", json); fflush(port); }

static void error(const char *cls, const char *desc) {
    fprintf(port, "{\"error\": {\"class\": \"%s\", \"desc\": ", cls);
    jstr(port, desc);
    fputs("}}\n", port);
    fflush(port);
}

static void reap(void) {
    int st, pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0)
        for (int i = 0; i < MAXJOBS; i++)
            if (jobs[i].pid == pid) { jobs[i].done = 1; jobs[i].status = st; }
}

/* Parse a JSON array of strings at p into ptrs (NULL-terminated), copied into buf. */
static int strlist(const char *p, char **ptrs, int maxn, char *buf, size_t bufsize) {
    int n = 0;
    char *a = buf;
    if (!p || *p != '[') { ptrs[0] = NULL; return 0; }
    for (p++; *p && *p != ']' && n < maxn - 1;) {
        while (*p == ' ' || *p == ',') p++;
        if (*p != '"') break;
        p = str(p, a, (size_t)(buf + bufsize - a));
        ptrs[n++] = a;
        a += strlen(a) + 1;
    }
    ptrs[n] = NULL;
    return n;
}

static void cmd_exec(const char *req) {
    static char path[4096], argbuf[MAXLINE], envbuf[1 << 16];
    static unsigned char input[MAXLINE];
    static char *argv[MAXARGS], *envp[512];
    int argc = 0, has_env = 0, capture = 0;
    const char *p = find(req, "path");
    if (!p || !str(p, path, sizeof path)) { error("GenericError", "guest-exec: path missing"); return; }
    /* (find() takes the first match: the host sends "arg", whose strings may
     * be anything, last.) */
    if ((p = find(req, "env")) && *p == '[') { strlist(p, envp, 512, envbuf, sizeof envbuf); has_env = 1; }
    if ((p = find(req, "capture-output")) && !strncmp(p, "true", 4)) capture = 1;
    argv[argc++] = path;
    argc += strlist(find(req, "arg"), argv + 1, MAXARGS - 1, argbuf, sizeof argbuf);
    argv[argc] = NULL;
    size_t inlen = 0;
    if ((p = find(req, "input-data")) && *p == '"') {
        const char *e = strchr(p + 1, '"');
        if (e) inlen = b64dec(p + 1, (size_t)(e - p - 1), input);
    }
    int slot = -1;
    reap();
    for (int i = 0; i < MAXJOBS; i++) if (!jobs[i].pid) { slot = i; break; }
    if (slot < 0) for (int i = 0; i < MAXJOBS; i++) if (jobs[i].done) { unlink(jobs[i].out); slot = i; break; }
    if (slot < 0) { error("GenericError", "guest-exec: too many processes"); return; }
    snprintf(jobs[slot].out, sizeof jobs[slot].out, "/tmp/.ic-agent-%d.out", slot);
    int in[2];
    if (pipe(in) < 0) { error("GenericError", strerror(errno)); return; }
    int pid = fork();
    if (pid == 0) {
        /* Like qemu-ga: without capture-output the output goes to /dev/null. */
        int fd = capture ? open(jobs[slot].out, O_WRONLY | O_CREAT | O_TRUNC, 0600) : open("/dev/null", O_WRONLY);
        dup2(in[0], 0); dup2(fd, 1); dup2(fd, 2);
        close(in[0]); close(in[1]); close(fd);
        for (int i = 0; i < MAXFILES; i++) if (files[i]) close(files[i] - 1);
        /* Like qemu-ga (g_spawn with envp): env replaces the environment;
         * the program is looked up in the agent's own PATH. */
        if (has_env) execvpe(path, argv, envp);
        else execvp(path, argv);
        _exit(127);
    }
    close(in[0]);
    if (pid < 0) { close(in[1]); error("GenericError", strerror(errno)); return; }
    for (size_t off = 0; off < inlen;) {
        ssize_t n = write(in[1], input + off, inlen - off);
        if (n <= 0) break;
        off += (size_t)n;
    }
    close(in[1]);
    jobs[slot].pid = pid; jobs[slot].done = 0; jobs[slot].capture = capture;
    fprintf(port, "{\"return\": {\"pid\": %d}}\n", pid);
    fflush(port);
}

static void cmd_exec_status(const char *req) {
    const char *p = find(req, "pid");
    int pid = p ? atoi(p) : -1;
    reap();
    for (int i = 0; i < MAXJOBS; i++) {
        if (jobs[i].pid != pid) continue;
        if (!jobs[i].done) { reply_raw("{\"exited\": false}"); return; }
        int st = jobs[i].status;
        fprintf(port, "{\"return\": {\"exited\": true, \"exitcode\": %d", WIFEXITED(st) ? WEXITSTATUS(st) : -1);
        if (WIFSIGNALED(st)) fprintf(port, ", \"signal\": %d", WTERMSIG(st));
        FILE *f = jobs[i].capture ? fopen(jobs[i].out, "rb") : NULL;
        if (f) {
            static unsigned char buf[MAXLINE];
            size_t n = fread(buf, 1, sizeof buf, f);
            fclose(f);
            fputs(", \"out-data\": \"", port);
            b64enc(buf, n, port);
            fputc('"', port);
        }
        fputs("}}\n", port);
        fflush(port);
        unlink(jobs[i].out);
        jobs[i].pid = 0;
        return;
    }
    error("GenericError", "guest-exec-status: no such process");
}

/* -- guest-file-*: like qemu-ga's (its modes, its replies, its error texts) -- */

static int file_fd(const char *req) {
    const char *p = find(req, "handle");
    long h = p ? atol(p) - HANDLE0 : -1;
    if (h < 0 || h >= MAXFILES || !files[h]) { error("GenericError", "handle does not exist"); return -1; }
    return files[h] - 1;
}

static void cmd_file_open(const char *req) {
    static const struct { const char *mode; int flags; } modes[] = {
        {"r", O_RDONLY}, {"rb", O_RDONLY},
        {"w", O_WRONLY | O_CREAT | O_TRUNC}, {"wb", O_WRONLY | O_CREAT | O_TRUNC},
        {"a", O_WRONLY | O_CREAT | O_APPEND}, {"ab", O_WRONLY | O_CREAT | O_APPEND},
        {"r+", O_RDWR}, {"rb+", O_RDWR}, {"r+b", O_RDWR},
        {"w+", O_RDWR | O_CREAT | O_TRUNC}, {"wb+", O_RDWR | O_CREAT | O_TRUNC}, {"w+b", O_RDWR | O_CREAT | O_TRUNC},
        {"a+", O_RDWR | O_CREAT | O_APPEND}, {"ab+", O_RDWR | O_CREAT | O_APPEND}, {"a+b", O_RDWR | O_CREAT | O_APPEND},
    };
    static char path[4096];
    char mode[16] = "r", msg[4400];
    const char *p = find(req, "path");
    if (!p || !str(p, path, sizeof path)) { error("GenericError", "guest-file-open: path missing"); return; }
    if ((p = find(req, "mode")) && *p == '"') str(p, mode, sizeof mode);
    int flags = -1;
    for (size_t i = 0; i < sizeof modes / sizeof modes[0]; i++) if (!strcmp(modes[i].mode, mode)) flags = modes[i].flags;
    if (flags < 0) { snprintf(msg, sizeof msg, "invalid file open mode '%s'", mode); error("GenericError", msg); return; }
    int slot = -1;
    for (int i = 0; i < MAXFILES; i++) if (!files[i]) { slot = i; break; }
    if (slot < 0) { error("GenericError", "too many open files"); return; }
    int fd = open(path, flags | O_CLOEXEC, 0600);  /* 0600 as qemu-ga since CVE-2013-2007 */
    if (fd < 0) {
        snprintf(msg, sizeof msg, "failed to open file '%s' (mode: '%s'): %s", path, mode, strerror(errno));
        error("GenericError", msg);
        return;
    }
    files[slot] = fd + 1;
    fprintf(port, "{\"return\": %d}\n", HANDLE0 + slot);
    fflush(port);
}

static void cmd_file_read(const char *req) {
    int fd = file_fd(req);
    if (fd < 0) return;
    const char *p = find(req, "count");
    long count = p ? atol(p) : 4096;
    if (count < 0 || count > READ_MAX) { error("GenericError", "value is invalid for argument count"); return; }
    unsigned char *buf = malloc((size_t)count + 1);
    if (!buf) { error("GenericError", "out of memory"); return; }
    long got = 0;
    int eof = 0;
    while (got < count) {
        ssize_t n = read(fd, buf + got, (size_t)(count - got));
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) {
            char msg[200];
            snprintf(msg, sizeof msg, "failed to read file: %s", strerror(errno));
            free(buf);
            error("GenericError", msg);
            return;
        }
        if (n == 0) { eof = 1; break; }
        got += n;
    }
    fprintf(port, "{\"return\": {\"count\": %ld", got);
    if (got) { fputs(", \"buf-b64\": \"", port); b64enc(buf, (size_t)got, port); fputc('"', port); }
    fprintf(port, ", \"eof\": %s}}\n", eof ? "true" : "false");
    fflush(port);
    free(buf);
}

static void cmd_file_write(const char *req) {
    static unsigned char buf[MAXLINE];
    int fd = file_fd(req);
    if (fd < 0) return;
    const char *p = find(req, "buf-b64");
    if (!p || *p != '"') { error("GenericError", "guest-file-write: buf-b64 missing"); return; }
    const char *e = strchr(p + 1, '"');
    size_t n = e ? b64dec(p + 1, (size_t)(e - p - 1), buf) : 0;
    if ((p = find(req, "count"))) {
        long c = atol(p);
        if (c < 0 || (size_t)c > n) { error("GenericError", "value is invalid for argument count"); return; }
        n = (size_t)c;
    }
    size_t off = 0;
    while (off < n) {
        ssize_t w = write(fd, buf + off, n - off);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
            char msg[200];
            snprintf(msg, sizeof msg, "failed to write to file: %s", strerror(errno));
            error("GenericError", msg);
            return;
        }
        off += (size_t)w;
    }
    fprintf(port, "{\"return\": {\"count\": %zu, \"eof\": false}}\n", off);
    fflush(port);
}

static void cmd_file_seek(const char *req) {
    int fd = file_fd(req);
    if (fd < 0) return;
    const char *p = find(req, "offset");
    long long off = p ? atoll(p) : 0;
    int whence = SEEK_SET;
    if ((p = find(req, "whence"))) {
        char w[16] = "";
        if (*p == '"') str(p, w, sizeof w);
        if (*p == '"') whence = !strcmp(w, "cur") ? SEEK_CUR : !strcmp(w, "end") ? SEEK_END : SEEK_SET;
        else whence = atoi(p);
    }
    off_t pos = lseek(fd, (off_t)off, whence);
    if (pos < 0) {
        char msg[200];
        snprintf(msg, sizeof msg, "failed to seek file: %s", strerror(errno));
        error("GenericError", msg);
        return;
    }
    fprintf(port, "{\"return\": {\"position\": %lld, \"eof\": false}}\n", (long long)pos);
    fflush(port);
}

static void cmd_file_close(const char *req, int flush_only) {
    int fd = file_fd(req);
    if (fd < 0) return;
    if (!flush_only) {
        const char *p = find(req, "handle");
        files[atol(p) - HANDLE0] = 0;
        if (close(fd) < 0) {
            char msg[200];
            snprintf(msg, sizeof msg, "failed to close handle: %s", strerror(errno));
            error("GenericError", msg);
            return;
        }
    }
    reply_raw("{}");
}

static void cmd_interfaces(void) {
    struct ifaddrs *ifa, *i;
    DIR *d = opendir("/sys/class/net");
    struct dirent *e;
    int first = 1;
    if (getifaddrs(&ifa) < 0) ifa = NULL;
    fputs("{\"return\": [", port);
    while (d && (e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char path[300], mac[64] = "";
        snprintf(path, sizeof path, "/sys/class/net/%s/address", e->d_name);
        FILE *f = fopen(path, "r");
        if (f) { if (fgets(mac, sizeof mac, f)) mac[strcspn(mac, "\n")] = 0; fclose(f); }
        fprintf(port, "%s{\"name\": ", first ? "" : ", ");
        jstr(port, e->d_name);
        fputs(", \"hardware-address\": ", port);
        jstr(port, mac);
        fputs(", \"ip-addresses\": [", port);
        int f2 = 1;
        for (i = ifa; i; i = i->ifa_next) {
            if (!i->ifa_addr || strcmp(i->ifa_name, e->d_name)) continue;
            int fam = i->ifa_addr->sa_family;
            if (fam != AF_INET && fam != AF_INET6) continue;
            char ip[64];
            void *src = fam == AF_INET ? (void *)&((struct sockaddr_in *)i->ifa_addr)->sin_addr
                                       : (void *)&((struct sockaddr_in6 *)i->ifa_addr)->sin6_addr;
            inet_ntop(fam, src, ip, sizeof ip);
            int prefix = 0;
            if (i->ifa_netmask) {
                unsigned char *m = fam == AF_INET ? (unsigned char *)&((struct sockaddr_in *)i->ifa_netmask)->sin_addr
                                                  : (unsigned char *)&((struct sockaddr_in6 *)i->ifa_netmask)->sin6_addr;
                for (int b = 0; b < (fam == AF_INET ? 4 : 16); b++) prefix += __builtin_popcount(m[b]);
            }
            fprintf(port, "%s{\"ip-address-type\": \"%s\", \"ip-address\": \"%s\", \"prefix\": %d}",
                    f2 ? "" : ", ", fam == AF_INET ? "ipv4" : "ipv6", ip, prefix);
            f2 = 0;
        }
        fputs("]}", port);
        first = 0;
    }
    fputs("]}\n", port);
    fflush(port);
    if (d) closedir(d);
    if (ifa) freeifaddrs(ifa);
}

static void handle(const char *req) {
    char cmd[64] = "";
    const char *p = find(req, "execute");
    if (!p || !str(p, cmd, sizeof cmd)) { error("GenericError", "no execute"); return; }
    if (!strcmp(cmd, "guest-sync") || !strcmp(cmd, "guest-sync-delimited")) {
        if (!strcmp(cmd, "guest-sync-delimited")) fputc(0xff, port);
        p = find(req, "id");
        fprintf(port, "{\"return\": %lld}\n", p ? atoll(p) : 0LL);
        fflush(port);
    } else if (!strcmp(cmd, "guest-ping")) {
        reply_raw("{}");
    } else if (!strcmp(cmd, "guest-info")) {
        reply_raw("{\"version\": \"instaclone-test-agent\", \"supported_commands\": ["
                  "{\"name\": \"guest-exec\", \"enabled\": true, \"success-response\": true}, "
                  "{\"name\": \"guest-file-open\", \"enabled\": true, \"success-response\": true}]}");
    } else if (!strcmp(cmd, "guest-exec")) {
        cmd_exec(req);
    } else if (!strcmp(cmd, "guest-exec-status")) {
        cmd_exec_status(req);
    } else if (!strcmp(cmd, "guest-file-open")) {
        cmd_file_open(req);
    } else if (!strcmp(cmd, "guest-file-read")) {
        cmd_file_read(req);
    } else if (!strcmp(cmd, "guest-file-write")) {
        cmd_file_write(req);
    } else if (!strcmp(cmd, "guest-file-seek")) {
        cmd_file_seek(req);
    } else if (!strcmp(cmd, "guest-file-flush")) {
        cmd_file_close(req, 1);
    } else if (!strcmp(cmd, "guest-file-close")) {
        cmd_file_close(req, 0);
    } else if (!strcmp(cmd, "guest-get-time")) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        fprintf(port, "{\"return\": %lld}\n", (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
        fflush(port);
    } else if (!strcmp(cmd, "guest-set-time")) {
        p = find(req, "time");
        if (p) {
            long long ns = atoll(p);
            struct timeval tv = { (time_t)(ns / 1000000000LL), (suseconds_t)(ns % 1000000000LL / 1000) };
            if (settimeofday(&tv, NULL) < 0) { error("GenericError", strerror(errno)); return; }
        }
        reply_raw("{}");
    } else if (!strcmp(cmd, "guest-get-host-name")) {
        char h[256] = "";
        gethostname(h, sizeof h - 1);
        fputs("{\"return\": {\"host-name\": ", port);
        jstr(port, h);
        fputs("}}\n", port);
        fflush(port);
    } else if (!strcmp(cmd, "guest-network-get-interfaces")) {
        cmd_interfaces();
    } else {
        error("CommandNotFound", cmd);
    }
}

/* A line in the guest's kernel log (the agent's own output goes nowhere). */
static void kmsg(const char *what) {
    char msg[300];
    int fd = open("/dev/kmsg", O_WRONLY | O_CLOEXEC);
    if (fd < 0) return;
    int n = snprintf(msg, sizeof msg, "%s: %s\n", what, strerror(errno));
    if (n > 0) { ssize_t w = write(fd, msg, (size_t)n); (void)w; }
    close(fd);
}

int main(int argc, char **argv) {
    const char *dev = argc > 1 ? argv[1] : NULL;
    static char line[MAXLINE];
    char found[300];
    if (!dev) {
        /* No udev here: find the port by its name in sysfs. */
        for (int tries = 0; !dev && tries < 100; tries++) {
            DIR *d = opendir("/sys/class/virtio-ports");
            struct dirent *e;
            while (d && (e = readdir(d))) {
                char path[300], name[128] = "";
                snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
                FILE *f = fopen(path, "r");
                if (!f) continue;
                if (fgets(name, sizeof name, f) && !strncmp(name, "org.qemu.guest_agent.0", 22)) {
                    snprintf(found, sizeof found, "/dev/%s", e->d_name);
                    dev = found;
                }
                fclose(f);
            }
            if (d) closedir(d);
            if (!dev) usleep(100000);
        }
        if (!dev) { fprintf(stderr, "ic-agent: no org.qemu.guest_agent.0 port\n"); return 1; }
    }
    /* Replies go out through a stream of their own on a second descriptor. */
    int fd;
    while ((fd = open(dev, O_RDWR | O_CLOEXEC)) < 0) sleep(1);
    port = fdopen(fcntl(fd, F_DUPFD_CLOEXEC, 3), "w");
    if (!port) { kmsg("ic-agent: fdopen failed"); return 1; }
    /* Requests are read with read(2), not stdio: a virtio port reads 0 bytes
     * while the host side is not connected, which is no end of file (qemu-ga
     * carries on too); a request cut short that way is completed by the
     * bytes that follow. */
    size_t len = 0;
    for (;;) {
        ssize_t n = read(fd, line + len, sizeof line - 1 - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) { kmsg("ic-agent: reading the port failed"); sleep(1); continue; }
        if (n == 0) { usleep(len ? 5000 : 50000); continue; }
        len += (size_t)n;
        char *nl;
        while ((nl = memchr(line, '\n', len))) {
            *nl = 0;
            /* A request starts at its last '{"execute"' (inside a JSON string a
             * quote is escaped): what came before was cut off for good. */
            char *req = line, *p;
            while ((p = strstr(req + 1, "{\"execute\"")) != NULL) req = p;
            if (strchr(req, '{')) handle(req);
            size_t used = (size_t)(nl + 1 - line);
            memmove(line, nl + 1, len - used);
            len -= used;
        }
        if (len >= sizeof line - 1) { kmsg("ic-agent: request too long, dropped"); len = 0; }
    }
}
