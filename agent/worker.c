/* The worker thread (see worker.h). */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <systemd/sd-event.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "util.h"
#include "worker.h"

struct job {
        worker_fn fn;
        worker_done_fn done;
        void *userdata;
        int r;
};

struct worker {
        sd_event_source *source;
        int fd;                             /* eventfd: a job finished */
        pthread_t thread;
        bool started;

        pthread_mutex_t lock;               /* guards everything below */
        pthread_cond_t cond;
        bool stop, exited;
        struct job queue[WORKER_QUEUE_MAX]; /* not started yet, in order */
        size_t n_queue;
        struct job finished[WORKER_QUEUE_MAX + 1];   /* done not yet run */
        size_t n_finished;
};

static void *worker_thread(void *userdata) {
        struct worker *w = userdata;

        pthread_mutex_lock(&w->lock);
        for (;;) {
                struct job j;

                while (!w->stop && w->n_queue == 0)
                        pthread_cond_wait(&w->cond, &w->lock);
                if (w->stop)
                        break;
                j = w->queue[0];
                w->n_queue--;
                for (size_t i = 0; i < w->n_queue; i++)
                        w->queue[i] = w->queue[i + 1];
                pthread_mutex_unlock(&w->lock);

                j.r = j.fn(j.userdata);

                pthread_mutex_lock(&w->lock);
                w->finished[w->n_finished++] = j;
                (void) eventfd_write(w->fd, 1);
        }
        w->exited = true;
        pthread_cond_broadcast(&w->cond);
        pthread_mutex_unlock(&w->lock);
        return NULL;
}

static int on_finished(sd_event_source *s, int fd, uint32_t revents, void *userdata) {
        struct worker *w = userdata;
        struct job done[WORKER_QUEUE_MAX + 1];
        size_t n;
        eventfd_t v;

        (void) eventfd_read(fd, &v);
        pthread_mutex_lock(&w->lock);
        n = w->n_finished;
        for (size_t i = 0; i < n; i++)
                done[i] = w->finished[i];
        w->n_finished = 0;
        pthread_mutex_unlock(&w->lock);
        for (size_t i = 0; i < n; i++)
                done[i].done(done[i].userdata, done[i].r);
        return 0;
}

int worker_new(sd_event *e, struct worker **ret) {
        struct worker *w;
        int r;

        w = calloc(1, sizeof(*w));
        if (!w)
                return log_error_errno(ENOMEM, "Cannot set up the worker: %m");
        w->fd = -1;
        pthread_mutex_init(&w->lock, NULL);
        pthread_cond_init(&w->cond, NULL);
        w->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (w->fd < 0) {
                r = log_error_errno(errno, "Cannot create the worker's eventfd: %m");
                goto fail;
        }
        r = sd_event_add_io(e, &w->source, w->fd, EPOLLIN, on_finished, w);
        if (r < 0) {
                log_error_errno(r, "Cannot watch the worker's eventfd: %m");
                goto fail;
        }
        r = -pthread_create(&w->thread, NULL, worker_thread, w);
        if (r < 0) {
                log_error_errno(r, "Cannot start the worker thread: %m");
                goto fail;
        }
        w->started = true;
        *ret = w;
        return 0;
fail:
        (void) worker_free(w, 0);
        return r;
}

bool worker_free(struct worker *w, uint64_t wait_usec) {
        bool exited = true;

        if (!w)
                return true;
        if (w->started) {
                uint64_t deadline = now_usec(CLOCK_REALTIME) + wait_usec;
                struct timespec ts = { (time_t) (deadline / USEC_PER_SEC),
                                       (long) (deadline % USEC_PER_SEC) * 1000 };

                pthread_mutex_lock(&w->lock);
                w->stop = true;
                pthread_cond_broadcast(&w->cond);
                while (!w->exited && pthread_cond_timedwait(&w->cond, &w->lock, &ts) == 0)
                        ;
                exited = w->exited;
                pthread_mutex_unlock(&w->lock);
                if (exited)
                        pthread_join(w->thread, NULL);
                else {
                        /* Its job still holds the TPM (or the disk): leave it to
                         * end with the process rather than hang the stop. */
                        log_warning("Stopping with a TPM or disk job still running after %" PRIu64
                                    " s: abandoned (is the TPM answering?)", wait_usec / USEC_PER_SEC);
                        pthread_detach(w->thread);
                        return false;   /* the thread still uses w */
                }
        }
        /* What the loop has not seen yet still gets its done, so that its
         * owner frees it: finished jobs with their result, the ones never
         * started with -ECANCELED. (The thread has exited: no lock needed.) */
        for (size_t i = 0; i < w->n_finished; i++)
                w->finished[i].done(w->finished[i].userdata, w->finished[i].r);
        for (size_t i = 0; i < w->n_queue; i++)
                w->queue[i].done(w->queue[i].userdata, -ECANCELED);
        w->n_finished = w->n_queue = 0;
        sd_event_source_disable_unref(w->source);
        if (w->fd >= 0)
                close(w->fd);
        pthread_cond_destroy(&w->cond);
        pthread_mutex_destroy(&w->lock);
        free(w);
        return true;
}

int worker_submit(struct worker *w, worker_fn fn, worker_done_fn done, void *userdata) {
        int r = 0;

        pthread_mutex_lock(&w->lock);
        /* Bounds finished[] too: at most the queue plus the running job. */
        if (w->n_queue + w->n_finished >= WORKER_QUEUE_MAX)
                r = -EBUSY;
        else {
                w->queue[w->n_queue++] = (struct job) { .fn = fn, .done = done, .userdata = userdata };
                pthread_cond_signal(&w->cond);
        }
        pthread_mutex_unlock(&w->lock);
        return r;
}
