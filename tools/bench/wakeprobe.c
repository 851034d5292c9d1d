// SPDX-License-Identifier: GPL-2.0
/*
 * wakeprobe: wakeup latency under load, in the manner of schbench.
 *
 * M message threads each own W worker threads. A message thread, in a loop: takes a
 * CLOCK_MONOTONIC timestamp, wakes the next of its workers (round robin) and sleeps until that
 * worker answers. The woken worker records now - timestamp (its wakeup latency: the futex wake,
 * the scheduler putting it on a CPU, the context switch), does one "request" (a fixed number of
 * iterations of a dependent integer loop, --request-loops, or calibrated to --request-us on an
 * idle CPU at start), and answers. The message thread also records the request latency (wake to
 * answer received: wakeup + work + the wakeup of the message thread itself).
 *
 * Wakeups go through a private futex per worker (and one per message thread for the answers),
 * as in schbench: FUTEX_WAKE is the shortest path from one thread making another runnable (no
 * file descriptor, no VFS, no buffer copy as with a pipe or an eventfd), so the measured latency
 * is the scheduler's wakeup path and not I/O plumbing.
 *
 * Samples are kept whole (per-thread growing buffers, 8 bytes each), so the percentiles are
 * exact (nearest rank over every sample of the measured window). A warm-up (--warmup-s) runs
 * first and is not counted.
 *
 *   wakeprobe [-m M] [-w W] [-r SECONDS] [--warmup-s S] [--request-us US | --request-loops N]
 *             [--json]
 *   wakeprobe --calibrate [--json]    loops per microsecond of the request loop, then exit
 *
 * Exit status: 0; 1 on an error (one line on stderr); 2 on bad usage; 130 when stopped by
 * SIGINT/SIGTERM (the partial results are still printed, marked interrupted).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CACHELINE 64
#define MAX_THREADS 4096

enum phase { PH_WARMUP, PH_MEASURE, PH_STOP };
enum go { GO_IDLE, GO_REQUEST, GO_EXIT };

struct samples {
	uint64_t *v;
	size_t n, cap;
};

struct msg;

struct worker {
	_Atomic uint32_t go; /* futex word: enum go */
	uint64_t wake_ns;    /* written by the message thread before go = GO_REQUEST */
	int measured;        /* the request belongs to the measured window */
	struct msg *msg;
	struct samples lat;  /* wakeup latencies, ns */
	uint64_t not_asleep; /* measured wakeups that found the worker still awake */
	uint64_t sink;       /* the request's result, kept so the loop is not optimised out */
	pthread_t tid;
} __attribute__((aligned(CACHELINE)));

struct msg {
	_Atomic uint32_t done; /* futex word: 1 when the current request was answered */
	struct worker *workers;
	int nworkers;
	struct samples rtt; /* request latencies, ns */
	uint64_t requests;  /* measured requests answered */
	pthread_t tid;
} __attribute__((aligned(CACHELINE)));

static _Atomic int phase = PH_WARMUP;
static uint64_t request_loops;

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("wakeprobe: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		die("clock_gettime: %s", strerror(errno));
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void futex_wait(_Atomic uint32_t *addr, uint32_t val, int *slept)
{
	long r = syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);

	if (r == 0) {
		*slept = 1;
		return;
	}
	if (errno != EAGAIN && errno != EINTR)
		die("futex wait: %s", strerror(errno));
}

static void futex_wake(_Atomic uint32_t *addr)
{
	if (syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0) < 0)
		die("futex wake: %s", strerror(errno));
}

static void push(struct samples *s, uint64_t v)
{
	if (s->n == s->cap) {
		size_t cap = s->cap ? s->cap * 2 : 4096;
		uint64_t *nv = realloc(s->v, cap * sizeof(*nv));

		if (!nv)
			die("out of memory for %zu samples", cap);
		s->v = nv;
		s->cap = cap;
	}
	s->v[s->n++] = v;
}

/* One request: n iterations of a dependent multiply-add chain the compiler cannot shorten. */
static uint64_t work(uint64_t n)
{
	uint64_t x = 88172645463325252ull;

	for (uint64_t i = 0; i < n; i++) {
		x = x * 6364136223846793005ull + 1442695040888963407ull;
		__asm__ volatile("" : "+r"(x));
	}
	return x;
}

/* Loops per microsecond: the best of several short trials (the least disturbed one). */
static double calibrate(void)
{
	uint64_t n = 1000, sink = 0;
	double best = 0;

	for (;;) { /* grow n until one trial takes >= 5 ms */
		uint64_t t0 = now_ns();

		sink += work(n);
		if (now_ns() - t0 >= 5000000ull)
			break;
		n *= 2;
	}
	for (int i = 0; i < 15; i++) { /* spread over ~150 ms: one trial likely runs alone */
		struct timespec gap = { 0, 5000000 };
		uint64_t t0;
		double rate;

		nanosleep(&gap, NULL);
		t0 = now_ns();
		sink += work(n);
		rate = (double)n / ((double)(now_ns() - t0) / 1000.0);
		if (rate > best)
			best = rate;
	}
	__asm__ volatile("" : : "r"(sink));
	return best;
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct msg *m = w->msg;

	for (;;) {
		uint32_t v;
		int slept = 0;
		uint64_t t;

		while ((v = atomic_load_explicit(&w->go, memory_order_acquire)) == GO_IDLE)
			futex_wait(&w->go, GO_IDLE, &slept);
		if (v == GO_EXIT)
			break;
		t = now_ns();
		if (w->measured) {
			push(&w->lat, t - w->wake_ns);
			if (!slept)
				w->not_asleep++;
		}
		w->sink = work(request_loops);
		atomic_store_explicit(&w->go, GO_IDLE, memory_order_relaxed);
		atomic_store_explicit(&m->done, 1, memory_order_release);
		futex_wake(&m->done);
	}
	return NULL;
}

static void *msg_main(void *arg)
{
	struct msg *m = arg;
	int i = 0;

	for (;;) {
		int ph = atomic_load_explicit(&phase, memory_order_relaxed);
		struct worker *w = &m->workers[i];
		int slept = 0;
		uint64_t t;

		if (ph == PH_STOP)
			break;
		w->measured = ph == PH_MEASURE;
		t = now_ns();
		w->wake_ns = t;
		atomic_store_explicit(&w->go, GO_REQUEST, memory_order_release);
		futex_wake(&w->go);
		while (atomic_load_explicit(&m->done, memory_order_acquire) == 0)
			futex_wait(&m->done, 0, &slept);
		atomic_store_explicit(&m->done, 0, memory_order_relaxed);
		if (w->measured) {
			push(&m->rtt, now_ns() - t);
			m->requests++;
		}
		i = (i + 1) % m->nworkers;
	}
	for (int j = 0; j < m->nworkers; j++) {
		atomic_store_explicit(&m->workers[j].go, GO_EXIT, memory_order_release);
		futex_wake(&m->workers[j].go);
	}
	return NULL;
}

/* Sleeps up to s seconds; returns 1 when SIGINT or SIGTERM came first. */
static int sleep_or_signal(double s, const sigset_t *set)
{
	uint64_t end = now_ns() + (uint64_t)(s * 1e9);

	for (;;) {
		uint64_t t = now_ns();
		struct timespec ts;
		int sig;

		if (t >= end)
			return 0;
		ts.tv_sec = (time_t)((end - t) / 1000000000ull);
		ts.tv_nsec = (long)((end - t) % 1000000000ull);
		sig = sigtimedwait(set, NULL, &ts);
		if (sig == SIGINT || sig == SIGTERM)
			return 1;
		if (sig < 0 && errno != EAGAIN && errno != EINTR)
			die("sigtimedwait: %s", strerror(errno));
	}
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

struct stats {
	size_t n;
	double avg, min, p50, p90, p99, p999, max; /* us */
};

/* Nearest-rank percentile of sorted v[0..n). */
static double pct(const uint64_t *v, size_t n, double p)
{
	size_t rank = (size_t)ceil(p / 100.0 * (double)n);

	if (rank < 1)
		rank = 1;
	return (double)v[rank - 1] / 1000.0;
}

static struct stats summarize(struct samples *const *parts, size_t nparts)
{
	struct stats st = { 0 };
	uint64_t *all;
	size_t n = 0, k = 0;
	double sum = 0;

	for (size_t i = 0; i < nparts; i++)
		n += parts[i]->n;
	st.n = n;
	if (!n)
		return st;
	all = malloc(n * sizeof(*all));
	if (!all)
		die("out of memory for %zu samples", n);
	for (size_t i = 0; i < nparts; i++) {
		memcpy(all + k, parts[i]->v, parts[i]->n * sizeof(*all));
		k += parts[i]->n;
	}
	qsort(all, n, sizeof(*all), cmp_u64);
	for (size_t i = 0; i < n; i++)
		sum += (double)all[i];
	st.avg = sum / (double)n / 1000.0;
	st.min = (double)all[0] / 1000.0;
	st.p50 = pct(all, n, 50);
	st.p90 = pct(all, n, 90);
	st.p99 = pct(all, n, 99);
	st.p999 = pct(all, n, 99.9);
	st.max = (double)all[n - 1] / 1000.0;
	free(all);
	return st;
}

static void print_stats_json(const char *name, const struct stats *st, int last)
{
	printf("  \"%s\": {\"samples\": %zu, \"avg\": %.3f, \"min\": %.3f, \"p50\": %.3f, "
	       "\"p90\": %.3f, \"p99\": %.3f, \"p99_9\": %.3f, \"max\": %.3f}%s\n",
	       name, st->n, st->avg, st->min, st->p50, st->p90, st->p99, st->p999, st->max,
	       last ? "" : ",");
}

static void print_stats_text(const char *name, const struct stats *st)
{
	if (!st->n) {
		printf("%-16s no samples\n", name);
		return;
	}
	printf("%-16s avg %.1f  p50 %.1f  p90 %.1f  p99 %.1f  p99.9 %.1f  max %.1f  (%zu samples)\n",
	       name, st->avg, st->p50, st->p90, st->p99, st->p999, st->max, st->n);
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: wakeprobe [options]\n"
		"Wakeup latency under load: M message threads each wake their W workers in turn\n"
		"(futex) and wait for the answer; a worker records its wakeup latency, does one\n"
		"request of fixed work, answers.\n\n"
		"  -m, --message-threads M  message threads (default 2)\n"
		"  -w, --workers W          workers per message thread (default 2)\n"
		"  -r, --runtime-s S        measured window, seconds (default 10)\n"
		"      --warmup-s S         not counted, before the window (default 1)\n"
		"      --request-us US      work per request, microseconds of the request loop on\n"
		"                           an idle CPU, calibrated at start (default 100)\n"
		"      --request-loops N    work per request as a loop count (overrides\n"
		"                           --request-us; the same work whatever the load)\n"
		"      --calibrate          print the loop's iterations per microsecond and exit\n"
		"      --json               results as one JSON object on stdout\n"
		"  -h, --help               this text\n\n"
		"Latencies in microseconds, exact percentiles (nearest rank over every sample).\n"
		"Exit: 0; 1 error; 2 usage; 130 interrupted (partial results printed).\n");
}

static double parse_num(const char *opt, const char *s, double lo, double hi)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || end == s || *end || !(v >= lo && v <= hi)) {
		fprintf(stderr, "wakeprobe: %s wants a number in [%g, %g], not '%s'\n", opt, lo, hi,
			s);
		exit(2);
	}
	return v;
}

int main(int argc, char **argv)
{
	enum { O_WARMUP = 256, O_REQ_US, O_REQ_LOOPS, O_CALIBRATE, O_JSON };
	static const struct option opts[] = {
		{ "message-threads", required_argument, NULL, 'm' },
		{ "workers", required_argument, NULL, 'w' },
		{ "runtime-s", required_argument, NULL, 'r' },
		{ "warmup-s", required_argument, NULL, O_WARMUP },
		{ "request-us", required_argument, NULL, O_REQ_US },
		{ "request-loops", required_argument, NULL, O_REQ_LOOPS },
		{ "calibrate", no_argument, NULL, O_CALIBRATE },
		{ "json", no_argument, NULL, O_JSON },
		{ "help", no_argument, NULL, 'h' },
		{ 0 },
	};
	int nmsg = 2, nwork = 2, json = 0, only_calibrate = 0, interrupted;
	double runtime_s = 10, warmup_s = 1, request_us = 100, loops_per_us = 0, measured_s;
	uint64_t t0, t1, requests = 0, not_asleep = 0;
	struct msg *msgs;
	struct worker *workers;
	struct samples **lat_parts, **rtt_parts;
	struct stats lat, rtt;
	sigset_t sigs;
	size_t nw;
	int c, err;

	while ((c = getopt_long(argc, argv, "m:w:r:h", opts, NULL)) != -1) {
		switch (c) {
		case 'm':
			nmsg = (int)parse_num("--message-threads", optarg, 1, 256);
			break;
		case 'w':
			nwork = (int)parse_num("--workers", optarg, 1, 256);
			break;
		case 'r':
			runtime_s = parse_num("--runtime-s", optarg, 0.01, 86400);
			break;
		case O_WARMUP:
			warmup_s = parse_num("--warmup-s", optarg, 0, 86400);
			break;
		case O_REQ_US:
			request_us = parse_num("--request-us", optarg, 0, 1e7);
			break;
		case O_REQ_LOOPS:
			request_loops = (uint64_t)parse_num("--request-loops", optarg, 1, 1e12);
			break;
		case O_CALIBRATE:
			only_calibrate = 1;
			break;
		case O_JSON:
			json = 1;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind < argc) {
		fprintf(stderr, "wakeprobe: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if ((size_t)nmsg * (size_t)(nwork + 1) > MAX_THREADS) {
		fprintf(stderr, "wakeprobe: %d x (%d + 1) threads is over %d\n", nmsg, nwork,
			MAX_THREADS);
		return 2;
	}
	if (only_calibrate || !request_loops) {
		loops_per_us = calibrate();
		if (only_calibrate) {
			if (json)
				printf("{\"loops_per_us\": %.3f}\n", loops_per_us);
			else
				printf("%.3f loops per microsecond\n", loops_per_us);
			return 0;
		}
		request_loops = (uint64_t)llround(request_us * loops_per_us);
		if (!request_loops)
			request_loops = 1;
	}

	/* Only the main thread takes SIGINT/SIGTERM (sigtimedwait); the threads inherit the mask. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGTERM);
	if ((err = pthread_sigmask(SIG_BLOCK, &sigs, NULL)))
		die("pthread_sigmask: %s", strerror(err));

	nw = (size_t)nmsg * (size_t)nwork;
	msgs = aligned_alloc(CACHELINE, sizeof(*msgs) * (size_t)nmsg);
	workers = aligned_alloc(CACHELINE, sizeof(*workers) * nw);
	lat_parts = calloc(nw, sizeof(*lat_parts));
	rtt_parts = calloc((size_t)nmsg, sizeof(*rtt_parts));
	if (!msgs || !workers || !lat_parts || !rtt_parts)
		die("out of memory for %zu threads", nw + (size_t)nmsg);
	memset(msgs, 0, sizeof(*msgs) * (size_t)nmsg);
	memset(workers, 0, sizeof(*workers) * nw);
	for (int i = 0; i < nmsg; i++) {
		msgs[i].workers = &workers[(size_t)i * (size_t)nwork];
		msgs[i].nworkers = nwork;
		rtt_parts[i] = &msgs[i].rtt;
		for (int j = 0; j < nwork; j++) {
			struct worker *w = &msgs[i].workers[j];

			w->msg = &msgs[i];
			lat_parts[(size_t)i * (size_t)nwork + (size_t)j] = &w->lat;
			if ((err = pthread_create(&w->tid, NULL, worker_main, w)))
				die("pthread_create (worker): %s", strerror(err));
		}
	}
	for (int i = 0; i < nmsg; i++) {
		if ((err = pthread_create(&msgs[i].tid, NULL, msg_main, &msgs[i])))
			die("pthread_create (message thread): %s", strerror(err));
	}

	interrupted = sleep_or_signal(warmup_s, &sigs);
	t0 = now_ns();
	if (!interrupted) {
		atomic_store(&phase, PH_MEASURE);
		interrupted = sleep_or_signal(runtime_s, &sigs);
	}
	t1 = now_ns();
	atomic_store(&phase, PH_STOP);
	for (int i = 0; i < nmsg; i++)
		if ((err = pthread_join(msgs[i].tid, NULL)))
			die("pthread_join: %s", strerror(err));
	for (size_t i = 0; i < nw; i++)
		if ((err = pthread_join(workers[i].tid, NULL)))
			die("pthread_join: %s", strerror(err));

	for (int i = 0; i < nmsg; i++)
		requests += msgs[i].requests;
	for (size_t i = 0; i < nw; i++)
		not_asleep += workers[i].not_asleep;
	measured_s = (double)(t1 - t0) / 1e9;
	lat = summarize(lat_parts, nw);
	rtt = summarize(rtt_parts, (size_t)nmsg);

	if (json) {
		printf("{\n  \"message_threads\": %d,\n  \"workers\": %d,\n", nmsg, nwork);
		printf("  \"request_loops\": %" PRIu64 ",\n", request_loops);
		if (loops_per_us > 0)
			printf("  \"request_us\": %.3f,\n  \"loops_per_us\": %.3f,\n", request_us,
			       loops_per_us);
		printf("  \"warmup_s\": %.3f,\n  \"runtime_s\": %.3f,\n  \"measured_s\": %.3f,\n",
		       warmup_s, runtime_s, measured_s);
		printf("  \"requests\": %" PRIu64 ",\n  \"requests_per_s\": %.1f,\n", requests,
		       measured_s > 0 ? (double)requests / measured_s : 0.0);
		printf("  \"samples\": %zu,\n  \"not_asleep\": %" PRIu64 ",\n", lat.n, not_asleep);
		printf("  \"interrupted\": %s,\n", interrupted ? "true" : "false");
		print_stats_json("wakeup_us", &lat, 0);
		print_stats_json("request_latency_us", &rtt, 1);
		printf("}\n");
	} else {
		printf("wakeprobe: %d message threads x %d workers, request %" PRIu64 " loops", nmsg,
		       nwork, request_loops);
		if (loops_per_us > 0)
			printf(" (%.0f us at %.1f loops/us)", request_us, loops_per_us);
		printf(", %.1f s warm-up, %.2f s measured%s\n", warmup_s, measured_s,
		       interrupted ? " (interrupted)" : "");
		print_stats_text("wakeup, us:", &lat);
		print_stats_text("request, us:", &rtt);
		printf("requests/s:      %.1f (%" PRIu64 " requests; %" PRIu64
		       " wakeups found the worker awake)\n",
		       measured_s > 0 ? (double)requests / measured_s : 0.0, requests, not_asleep);
	}
	if (fflush(stdout) == EOF || ferror(stdout))
		die("writing the results: %s", strerror(errno));

	for (int i = 0; i < nmsg; i++)
		free(msgs[i].rtt.v);
	for (size_t i = 0; i < nw; i++)
		free(workers[i].lat.v);
	free(lat_parts);
	free(rtt_parts);
	free(workers);
	free(msgs);
	return interrupted ? 130 : 0;
}
