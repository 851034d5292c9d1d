/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlsched_mlp.h - the model's Dense stack evaluated in BPF, in fixed point.
 *
 * Included by the scheduler (a decision-table miss with --inference kernel)
 * and by tools/bench/mlp_bench.bpf.c, whose BPF_PROG_TEST_RUN measures and
 * checks this very code on any kernel. The arithmetic is documented with
 * struct mlsched_mlp in mlsched.h.
 */
#ifndef __MLSCHED_MLP_H
#define __MLSCHED_MLP_H

#include "mlsched.h"

/* The weights, two slots (see mlsched.h); written only by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, u32);
	__type(value, struct mlsched_mlp);
} mlp_weights SEC(".maps");

/* Hidden activations, Q16.16, per CPU: two [64] s32 rows overflow the BPF stack with the rest. */
struct mlp_scratch {
	s32 act[2][MLSCHED_MLP_MAX_UNITS];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct mlp_scratch);
} mlp_scratch SEC(".maps");

static __always_inline s32 mlp_clamp(s64 v)
{
	if (v > 0x7fffffffLL)
		return 0x7fffffff;
	if (v < -0x80000000LL)
		return -0x80000000;
	return v;
}

/*
 * Evaluate slot `slot` for generation gen on a candidate's decision key (its
 * quantized features; the model's reserved inputs are zero): 1 migrate,
 * 0 keep, -1 when the slot does not serve this generation.
 */
static __noinline int mlp_decide(u32 slot, u32 gen, u64 key)
{
	u32 f = MLSCHED_KEY_FIELD_MAX;
	struct mlsched_mlp *m = bpf_map_lookup_elem(&mlp_weights, &slot);
	u32 zero = 0, l, i, j, k, n_out, n_chunks, nr_layers;
	struct mlp_scratch *sc = bpf_map_lookup_elem(&mlp_scratch, &zero);
	s64 z = 0;

	if (!m || !sc || m->generation != gen)
		return -1;
	nr_layers = m->nr_layers;
	if (!nr_layers || nr_layers > MLSCHED_MLP_MAX_LAYERS)
		return -1;
	bpf_for(i, 0, MLSCHED_MLP_MAX_UNITS)
		sc->act[0][i & (MLSCHED_MLP_MAX_UNITS - 1)] = 0;
	/* Q16.16; loads reach the model as q / LOAD_SCALE (16 = 2^4). */
	sc->act[0][0] = (key >> MLSCHED_KEY_CPU_SHIFT) << MLSCHED_MLP_FRAC_BITS;
	sc->act[0][1] = (key >> MLSCHED_KEY_IDLE_SHIFT & f) << MLSCHED_MLP_FRAC_BITS;
	sc->act[0][2] = (key >> MLSCHED_KEY_NOT_IDLE_SHIFT & f) << MLSCHED_MLP_FRAC_BITS;
	sc->act[0][3] = (key >> MLSCHED_KEY_SRC_SHIFT & f) << (MLSCHED_MLP_FRAC_BITS - 4);
	sc->act[0][4] = (key >> MLSCHED_KEY_DST_SHIFT & f) << (MLSCHED_MLP_FRAC_BITS - 4);

	bpf_for(l, 0, nr_layers) {
		u32 src = l & 1, dst = src ^ 1;

		if (l >= MLSCHED_MLP_MAX_LAYERS)
			break;
		n_out = m->nr_out[l];
		n_chunks = (m->nr_in[l] + 15) / 16;
		if (n_out > MLSCHED_MLP_MAX_UNITS || n_chunks > MLSCHED_MLP_MAX_UNITS / 16)
			return -1;
		bpf_for(j, 0, n_out) {
			u32 jj = j & (MLSCHED_MLP_MAX_UNITS - 1);
			s64 acc = 0;
			s32 out;

			/*
			 * The inputs in chunks of 16, unrolled: few iterator calls, and few
			 * enough live registers that the stack stays small. The last chunk
			 * may run past nr_in: those weights are zero (user space pads them).
			 */
			bpf_for(k, 0, n_chunks) {
				u32 base = (k * 16) & (MLSCHED_MLP_MAX_UNITS - 16);
#pragma unroll
				for (i = 0; i < 16; i++)
					acc += (s64)m->weight[l][base + i][jj] *
					       sc->act[src][base + i];
			}
			out = mlp_clamp((acc >> MLSCHED_MLP_FRAC_BITS) + m->bias[l][jj]);
			if (m->act[l] == MLSCHED_MLP_RELU && out < 0)
				out = 0;
			sc->act[dst][jj] = out;
			z = out;
		}
	}
	/* The last layer has one unit (user space checks): z is its value. */
	if (m->out_rule == MLSCHED_MLP_OUT_LINEAR)
		return z > (1LL << (MLSCHED_MLP_FRAC_BITS - 1));
	return z > 0;
}

#endif /* __MLSCHED_MLP_H */
