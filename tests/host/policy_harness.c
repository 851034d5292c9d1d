// SPDX-License-Identifier: GPL-2.0
/*
 * Runs the scheduler's pure policy functions (bpf/mlsched_policy.h, the very
 * header the BPF object includes) on the host: one call per input line,
 * "NAME ARG...", one decimal result per output line. Driven by
 * tests/host/test_policy.py.
 */
#include <stdio.h>
#include <string.h>
#include "mlsched_policy.h"

int main(void)
{
	char fn[32];
	unsigned long long a, b, c, d, e, f, g;

	while (scanf("%31s", fn) == 1) {
		if (!strcmp(fn, "ran") && scanf("%llu %llu", &a, &b) == 2)
			printf("%llu\n", (unsigned long long)mlsched_ran_ns(a, b));
		else if (!strcmp(fn, "charge") && scanf("%llu %llu", &a, &b) == 2)
			printf("%llu\n", (unsigned long long)mlsched_vtime_charge(a, b));
		else if (!strcmp(fn, "clamp") && scanf("%llu %llu %llu", &a, &b, &c) == 3)
			printf("%llu\n", (unsigned long long)mlsched_vtime_clamp(a, b, c));
		else if (!strcmp(fn, "slice") && scanf("%llu %llu %llu", &a, &b, &c) == 3)
			printf("%llu\n", (unsigned long long)mlsched_slice(a, b, c));
		else if (!strcmp(fn, "load") && scanf("%llu %llu", &a, &b) == 2)
			printf("%u\n", mlsched_load_q(a, b));
		else if (!strcmp(fn, "heuristic") && scanf("%llu %llu %llu", &a, &b, &c) == 3)
			printf("%d\n", mlsched_heuristic(a, b, c));
		else if (!strcmp(fn, "key") && scanf("%llu %llu %llu %llu %llu", &a, &b, &c, &d, &e) == 5)
			printf("%llu\n", (unsigned long long)mlsched_pack_key(a, b, c, d, e));
		else if (!strcmp(fn, "grid") &&
			 scanf("%llu %llu %llu %llu %llu %llu %llu", &a, &b, &c, &d, &e, &f, &g) == 7)
			printf("%lld\n", (long long)mlsched_grid_index(a, b, c, d, e, f, g));
		else if (!strcmp(fn, "gridsize") && scanf("%llu %llu", &a, &b) == 2)
			printf("%llu\n", (unsigned long long)mlsched_grid_size(a, b));
		else if (!strcmp(fn, "prop") && scanf("%llu %llu %llu", &a, &b, &c) == 3)
			printf("%u\n", mlsched_propensity_q16(a, b, c));
		else {
			fprintf(stderr, "policy_harness: bad input at %s\n", fn);
			return 2;
		}
	}
	return 0;
}
