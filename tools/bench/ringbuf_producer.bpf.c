/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ringbuf_producer - the kernel half of the decision-pipeline benchmark.
 *
 * A BPF_PROG_TYPE_SYSCALL program, run with BPF_PROG_TEST_RUN, that pushes
 * `nr` struct mlsched_candidate records into a ring buffer exactly as
 * mlsched's select_cpu does on a decision miss: reserve, fill, stamp with
 * bpf_ktime_get_ns(), submit (adaptive wakeup), count a drop when the ring is
 * full. It needs no sched_ext, so the same user-space pipeline (bcc reader ->
 * batch -> model -> batch map update) can be measured on a host kernel.
 *
 * Keys walk a counter through realistic field ranges (cpu 0..255, idle and
 * busy 0..31, dst load 0..15 below a full source domain), so 4 M consecutive
 * records carry distinct keys and every record asks the model for a decision.
 * The "candidates" and "decisions" maps are the scheduler's own (mlsched_maps.bpf.h).
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "mlsched.h"
#include "mlsched_policy.h"

char _license[] SEC("license") = "GPL";

#include "mlsched_maps.bpf.h"

/* Totals since load; one struct so that user space reads .bss with a fixed layout. */
struct producer_totals {
	u64 produced;	/* records submitted */
	u64 dropped;	/* ring buffer full: record not pushed */
	u64 next_seq;	/* the next record's key counter */
} totals;

/* BPF_PROG_TEST_RUN ctx_in. */
struct produce_args {
	u32 nr;		/* records to push in this run */
	u32 pad;
	u64 wake_bytes;	/* the scheduler's ring wakeup policy (mlsched_ring_wake) */
	u64 max_wait_ns;
};

/* The wakeup policy's state and settings, as in the scheduler. */
static u64 ring_oldest_ns, ring_wake_bytes = 64 * sizeof(struct mlsched_candidate);
static u64 ring_max_wait_ns = 2ULL * 1000 * 1000;

static long produce_one(u64 i, void *data)
{
	struct mlsched_candidate *rec;
	u64 seq = __sync_fetch_and_add(&totals.next_seq, 1);

	u64 avail = bpf_ringbuf_query(&candidates, BPF_RB_AVAIL_DATA), now;
	int wake;

	rec = bpf_ringbuf_reserve(&candidates, sizeof(*rec), 0);
	if (!rec) {
		__sync_fetch_and_add(&totals.dropped, 1);
		return 0;
	}
	rec->pid = 1;
	rec->cpu = seq & 255;
	rec->cpu_idle = (seq >> 8) & 31;
	rec->cpu_not_idle = (seq >> 13) & 31;
	rec->src_dom = 0;
	rec->dst_dom = 1;
	rec->src_load_q = MLSCHED_LOAD_SCALE;
	rec->dst_load_q = (seq >> 18) & (MLSCHED_LOAD_SCALE - 1);
	rec->key = mlsched_pack_key(rec->cpu, rec->cpu_idle, rec->cpu_not_idle, rec->src_load_q,
				    rec->dst_load_q);
	rec->action = MLSCHED_KEEP;		/* a miss the fallback kept */
	rec->source = MLSCHED_SRC_FALLBACK;
	now = rec->ts_ns = bpf_ktime_get_ns();
	wake = mlsched_ring_wake(avail, sizeof(*rec), now, &ring_oldest_ns, ring_wake_bytes,
				 ring_max_wait_ns);
	bpf_ringbuf_submit(rec, wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	__sync_fetch_and_add(&totals.produced, 1);
	return 0;
}

SEC("syscall")
int produce(struct produce_args *args)
{
	u32 nr = args->nr;

	if (nr > (1u << 20))
		nr = 1u << 20;
	if (args->wake_bytes)
		ring_wake_bytes = args->wake_bytes;
	if (args->max_wait_ns)
		ring_max_wait_ns = args->max_wait_ns;
	bpf_loop(nr, produce_one, NULL, 0);
	return 0;
}
