/*
 * A power-loss simulator for the tests, loaded with LD_PRELOAD: each fsync() or
 * fdatasync() of a regular file under $SNAPSHOT_WATCH, once the real call returned, copies
 * the file as it is then to $SNAPSHOT_DIR/<name> and logs <name> to $SNAPSHOT_DIR/log.
 * The snapshots are what the disk holds for sure; a test that kills the process and puts
 * them back in place of the files (deleting the files never synced) sees what a power
 * loss would have left: nothing written after a file's last sync.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static void copy_file(const char *from, const char *to) {
    int in = open(from, O_RDONLY | O_CLOEXEC);
    if (in < 0) return;
    int out = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (out >= 0) {
        char buf[1 << 16];
        ssize_t n;
        while ((n = read(in, buf, sizeof buf)) > 0) {
            if (write(out, buf, (size_t)n) != n) break;
        }
        close(out);
    }
    close(in);
}

static void snapshot(int fd) {
    const char *watch = getenv("SNAPSHOT_WATCH");
    const char *dir = getenv("SNAPSHOT_DIR");
    struct stat st;
    if (!watch || !dir || fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) return;
    char link[64], path[PATH_MAX];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t len = readlink(link, path, sizeof path - 1);
    if (len <= 0) return;
    path[len] = 0;
    if (strncmp(path, watch, strlen(watch)) != 0) return;
    const char *name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    char tmp[PATH_MAX], dest[PATH_MAX], log[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, name);
    snprintf(dest, sizeof dest, "%s/%s", dir, name);
    snprintf(log, sizeof log, "%s/log", dir);
    pthread_mutex_lock(&lock);
    copy_file(path, tmp);
    rename(tmp, dest);
    FILE *f = fopen(log, "a");
    if (f) {
        fprintf(f, "%s\n", name);
        fclose(f);
    }
    pthread_mutex_unlock(&lock);
}

int fsync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    int rc = real(fd);
    if (rc == 0) snapshot(fd);
    return rc;
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    int rc = real(fd);
    if (rc == 0) snapshot(fd);
    return rc;
}
