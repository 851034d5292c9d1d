/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlp_bench - the scheduler's in-kernel inference (bpf/mlsched_mlp.h), alone.
 *
 * A BPF_PROG_TYPE_SYSCALL program run with BPF_PROG_TEST_RUN: evaluates the
 * fixed-point network in mlp_weights on one decision key, `reps` times, and
 * reports the answer and the time taken. It needs no sched_ext, so the very
 * code the scheduler runs on a table miss is checked against its Python
 * mirror (tests/host/test_kernel_mlp.py) and timed (make bench-model) on a
 * host kernel.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include "mlsched_mlp.h"

char _license[] SEC("license") = "GPL";

struct mlp_run_args {
	__u64 key;		/* in: the decision key */
	__u32 slot;		/* in: mlp_weights slot */
	__u32 gen;		/* in: the generation it must serve */
	__u32 reps;		/* in: evaluations to time */
	__s32 result;		/* out: 1 migrate, 0 keep, -1 no weights */
	__u64 ns;		/* out: total time of the evaluations, ns */
};

SEC("syscall")
int mlp_run(struct mlp_run_args *a)
{
	u64 t0 = bpf_ktime_get_ns();
	int r = -1;
	u32 i;

	bpf_for(i, 0, a->reps)
		r = mlp_decide(a->slot, a->gen, a->key);
	a->ns = bpf_ktime_get_ns() - t0;
	a->result = r;
	return 0;
}
