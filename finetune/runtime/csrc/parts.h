/* Running a kernel over parts of its work on several threads: the caller's thread takes the
 * first part, one new thread each of the others. Shared by the host kernels (snake.c, elu.c);
 * native.library names a build by this header too, so a change here rebuilds them.
 */
#ifndef VF_PARTS_H
#define VF_PARTS_H

#include <pthread.h>
#include <stddef.h>

#define MAX_THREADS 64

/* How many threads `work` units are worth, at least `min_part` each: 1 to MAX_THREADS, at most
 * `threads`. */
static int part_count(long work, long min_part, int threads) {
    long most = work / min_part;
    if (threads > most) threads = (int)(most > 1 ? most : 1);
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    return threads < 1 ? 1 : threads;
}

/* run(&parts[i]) for i < count, each part `size` bytes, part 0 on this thread. Returns 0, or -1
 * when a thread could not start (its part is then done on this thread). */
static int run_parts(void *(*run)(void *), void *parts, size_t size, int count) {
    pthread_t ids[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *base = (char *)parts;
    int status = 0;
    for (int i = 1; i < count; i++) {
        started[i] = pthread_create(&ids[i], NULL, run, base + i * size) == 0;
    }
    run(base);
    for (int i = 1; i < count; i++) {
        if (started[i]) {
            pthread_join(ids[i], NULL);
        } else {
            run(base + i * size);
            status = -1;
        }
    }
    return status;
}

#endif
