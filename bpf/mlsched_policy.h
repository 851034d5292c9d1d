/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlsched_policy.h - the scheduler's arithmetic, as pure functions.
 *
 * Included by mlsched.bpf.c and, unchanged, by the host test harness
 * tests/host/policy_harness.c (gcc), so that the vtime charge, the clamps,
 * the load quantization, the fallback heuristic and the key packing the
 * kernel applies are tested as compiled C, and the Python mirrors in
 * loader/contract.py are checked against them.
 */
#ifndef __MLSCHED_POLICY_H
#define __MLSCHED_POLICY_H

#include "mlsched.h"

/* Time a task ran, from its start stamp: never negative, whatever the clock did. */
static inline __u64 mlsched_ran_ns(__u64 now, __u64 started_at)
{
	return started_at && now > started_at ? now - started_at : 0;
}

/*
 * Virtual time charged for ran_ns at a weight (100 = nice 0). Computed from
 * the run time, not from (slice given - slice left): the kernel may refill a
 * kept task's slice to its default, larger than ours, and that difference
 * wraps to 2^64.
 */
static inline __u64 mlsched_vtime_charge(__u64 ran_ns, __u64 weight)
{
	return ran_ns * 100 / (weight ? weight : 100);
}

/*
 * Where a task is queued relative to the vtime clock: a sleeper banks at most
 * one slice of credit; a task of low weight waits at most max_lag slices.
 */
static inline __u64 mlsched_vtime_clamp(__u64 vtime, __u64 vtime_now, __u64 slice_ns)
{
	__u64 lo = vtime_now - slice_ns;
	__u64 hi = vtime_now + MLSCHED_VTIME_MAX_LAG_SLICES * slice_ns;

	if ((__s64)(vtime - lo) < 0)
		return lo;
	if ((__s64)(vtime - hi) > 0)
		return hi;
	return vtime;
}

/* Slice for a task queued behind nr_waiting others: shorter as the queue grows. */
static inline __u64 mlsched_slice(__u64 slice_ns, __u64 slice_min_ns, __u64 nr_waiting)
{
	__u64 s = slice_ns / (nr_waiting + 1);

	return s < slice_min_ns ? slice_min_ns : s;
}

/* Load of a domain, 0..LOAD_SCALE: busy CPUs plus queued tasks per CPU. */
static inline __u32 mlsched_load_q(__u64 runnable, __u32 nr_cpus)
{
	__u64 load;

	if (!nr_cpus)
		return MLSCHED_LOAD_SCALE;
	load = runnable * MLSCHED_LOAD_SCALE / (MLSCHED_LOAD_FULL_PER_CPU * nr_cpus);
	return load > MLSCHED_LOAD_SCALE ? MLSCHED_LOAD_SCALE : load;
}

/* The heuristic fallback: migrate when the source is a quarter of scale busier. */
static inline int mlsched_heuristic(__u32 src_load_q, __u32 dst_load_q, __u32 cpu_idle)
{
	return src_load_q >= dst_load_q + MLSCHED_LOAD_SCALE / 4 && cpu_idle > 0;
}

static inline __u32 mlsched_clamp_field(__u64 v)
{
	return v > MLSCHED_KEY_FIELD_MAX ? MLSCHED_KEY_FIELD_MAX : v;
}

static inline __u64 mlsched_pack_key(__u32 cpu, __u32 cpu_idle, __u32 cpu_not_idle,
				     __u32 src_load_q, __u32 dst_load_q)
{
	return ((__u64)cpu << MLSCHED_KEY_CPU_SHIFT) |
	       ((__u64)mlsched_clamp_field(cpu_idle) << MLSCHED_KEY_IDLE_SHIFT) |
	       ((__u64)mlsched_clamp_field(cpu_not_idle) << MLSCHED_KEY_NOT_IDLE_SHIFT) |
	       ((__u64)src_load_q << MLSCHED_KEY_SRC_SHIFT) |
	       ((__u64)dst_load_q << MLSCHED_KEY_DST_SHIFT);
}

/*
 * Wake the ring's reader for this record? Records are submitted with
 * BPF_RB_NO_WAKEUP unless this says so: the reader is woken when the ring was
 * empty (it has drained it and sleeps: a lone candidate is decided at once),
 * when a batch's worth is waiting, or when the oldest waiting record is
 * max_wait_ns old. avail: bytes waiting before this record; *oldest: when the
 * current run of unread records began (kept here).
 */
static inline int mlsched_ring_wake(__u64 avail, __u64 rec_bytes, __u64 now, __u64 *oldest,
				    __u64 wake_bytes, __u64 max_wait_ns)
{
	if (!avail) {
		*oldest = now;
		return 1;
	}
	return avail + rec_bytes >= wake_bytes || now - *oldest >= max_wait_ns;
}

/*
 * Index of a key in the dense decision grid: the key's fields in key order,
 * each in 0..its bound (cpu < nr_cpus; cpu_idle and cpu_not_idle <= dom_cpus,
 * the largest domain's CPU count; loads <= LOAD_SCALE). Returns -1 outside it.
 */
static inline __s64 mlsched_grid_index(__u32 nr_cpus, __u32 dom_cpus, __u32 cpu, __u32 cpu_idle,
				       __u32 cpu_not_idle, __u32 src_load_q, __u32 dst_load_q)
{
	__u64 d = dom_cpus + 1, l = MLSCHED_LOAD_SCALE + 1;

	if (cpu >= nr_cpus || cpu_idle > dom_cpus || cpu_not_idle > dom_cpus ||
	    src_load_q > MLSCHED_LOAD_SCALE || dst_load_q > MLSCHED_LOAD_SCALE)
		return -1;
	return ((((__u64)cpu * d + cpu_idle) * d + cpu_not_idle) * l + src_load_q) * l + dst_load_q;
}

/* Keys in the grid of a machine with nr_cpus CPUs and domains of at most dom_cpus. */
static inline __u64 mlsched_grid_size(__u32 nr_cpus, __u32 dom_cpus)
{
	__u64 d = dom_cpus + 1, l = MLSCHED_LOAD_SCALE + 1;

	return (__u64)nr_cpus * d * d * l * l;
}

/*
 * Probability, in 1/65536 units, that the logging policy took `action`: with
 * exploration P (explore / 65536) a coin flip picks either action half the
 * time, else the fallback picks its own.
 */
static inline __u32 mlsched_propensity_q16(__u32 explore, int fallback_action, int action)
{
	__u32 p = explore / 2;

	if (fallback_action == action)
		p += MLSCHED_EXPLORE_SCALE - explore;
	return p;
}

#endif /* __MLSCHED_POLICY_H */
