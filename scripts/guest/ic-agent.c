/*
 * ic-agent: a minimal QEMU guest agent for instaclone's test guest.
 *
 * Speaks the subset of the QEMU guest agent protocol (one JSON object per
 * line on the virtio-serial port org.qemu.guest_agent.0) that instaclone
 * uses: guest-sync, guest-sync-delimited, guest-ping, guest-info,
 * guest-exec (+ input-data, capture-output), guest-exec-status,
 * guest-get-time, guest-set-time, guest-get-host-name,
 * guest-network-get-interfaces. Built statically by scripts/build-guest.sh;
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

#define MAXLINE (1 << 20)
#define MAXJOBS 64

struct job { int pid, done, status; char out[64]; };
static struct job jobs[MAXJOBS];
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
    size_t o = 0; unsigned v = 0; int bits = 0;
    for (size_t i = 0; i < n; i++) {
        const char *p = strchr(b64, in[i]);
        if (!p || !in[i]) continue;
        v = v << 6 | (unsigned)(p - b64); bits += 6;
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
        if (c == '\\' && p[1]) {
            p++;
            c = *p == 'n' ? '\n' : *p == 't' ? '\t' : *p;
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

static void cmd_exec(const char *req) {
    static char path[4096], argbuf[MAXLINE];
    static unsigned char input[MAXLINE];
    char *argv[256];
    int argc = 0;
    const char *p = find(req, "path");
    if (!p || !str(p, path, sizeof path)) { error("GenericError", "guest-exec: path missing"); return; }
    argv[argc++] = path;
    char *a = argbuf;
    if ((p = find(req, "arg")) && *p == '[') {
        for (p++; *p && *p != ']' && argc < 255;) {
            while (*p == ' ' || *p == ',') p++;
            if (*p != '"') break;
            p = str(p, a, argbuf + sizeof argbuf - a);
            argv[argc++] = a;
            a += strlen(a) + 1;
        }
    }
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
        int fd = open(jobs[slot].out, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        dup2(in[0], 0); dup2(fd, 1); dup2(fd, 2);
        close(in[0]); close(in[1]); close(fd);
        execvp(path, argv);
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
    jobs[slot].pid = pid; jobs[slot].done = 0;
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
        FILE *f = fopen(jobs[i].out, "rb");
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
                  "{\"name\": \"guest-exec\", \"enabled\": true, \"success-response\": true}]}");
    } else if (!strcmp(cmd, "guest-exec")) {
        cmd_exec(req);
    } else if (!strcmp(cmd, "guest-exec-status")) {
        cmd_exec_status(req);
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
    for (;;) {
        port = fopen(dev, "r+");
        if (!port) { sleep(1); continue; }
        setvbuf(port, NULL, _IOLBF, 0);
        while (fgets(line, sizeof line, port)) {
            if (strchr(line, '{')) handle(line);
        }
        fclose(port);  /* host side closed: reopen and wait for the next client */
        usleep(100000);
    }
}
