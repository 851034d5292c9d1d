/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlsched.h - the contract between the BPF scheduler and user space.
 *
 * Everything both sides must agree on lives here: the candidate record pushed
 * into the ring buffer, the decision key packing, the counter indices and the
 * map names. loader/contract.py mirrors it; tests/host/test_contract.py parses
 * this file and the compiled object's BTF and fails when the two drift.
 */
#ifndef __MLSCHED_H
#define __MLSCHED_H

#if !defined(__VMLINUX_H__) && !defined(__KERNEL__)
#include <linux/types.h>	/* host side: the harness and the contract parser */
#endif

#define MLSCHED_MAX_CPUS	512	/* size of the per-CPU config arrays */
#define MLSCHED_MAX_DOMS	64	/* scheduling domains (one DSQ each) */

/*
 * Loads are integers 0..LOAD_SCALE; the model sees q / LOAD_SCALE, so user
 * space computes exactly the decision the kernel will apply.
 */
#define MLSCHED_LOAD_SCALE	16
/* A domain is full (load 1.0) at this many runnable tasks per CPU. */
#define MLSCHED_LOAD_FULL_PER_CPU	4
/* How far ahead of the vtime clock a task may be queued, in slices. */
#define MLSCHED_VTIME_MAX_LAG_SLICES	4
/* explore (.rodata) and candidate.prob_q16 are probabilities in 1/EXPLORE_SCALE units. */
#define MLSCHED_EXPLORE_SCALE		65536

/*
 * Decision key: the quantized features of a candidate, packed in a u64.
 *   bits 63..32  cpu            (the CPU the task last ran on)
 *   bits 31..24  cpu_idle       (idle CPUs in the destination domain, <= 255)
 *   bits 23..16  cpu_not_idle   (busy CPUs in the source domain, <= 255)
 *   bits 15..8   src_load_q     (0..LOAD_SCALE)
 *   bits  7..0   dst_load_q     (0..LOAD_SCALE)
 */
#define MLSCHED_KEY_CPU_SHIFT		32
#define MLSCHED_KEY_IDLE_SHIFT		24
#define MLSCHED_KEY_NOT_IDLE_SHIFT	16
#define MLSCHED_KEY_SRC_SHIFT		8
#define MLSCHED_KEY_DST_SHIFT		0
#define MLSCHED_KEY_FIELD_MAX		255

/* Decision map values. */
enum mlsched_decision {
	MLSCHED_KEEP = 0,
	MLSCHED_MIGRATE = 1,
};

/*
 * The dense decision grid, array "decision_grid" (BPF_F_MMAPABLE, u64 words,
 * mlsched_grid_index() in mlsched_policy.h): byte i of the array holds key i's
 * decision, written by user space with plain stores. 0 = not decided yet.
 * Used when the machine's grid has at most MLSCHED_GRID_MAX_KEYS keys; the
 * "decisions" hash serves other machines, on demand.
 */
enum mlsched_grid_code {
	MLSCHED_GRID_UNDECIDED = 0,
	MLSCHED_GRID_KEEP = 1,
	MLSCHED_GRID_MIGRATE = 2,
};
#define MLSCHED_GRID_MAX_KEYS	(1u << 26)	/* 64 MiB of grid at most */

/*
 * "decisions" hash values: (generation << 8) | enum mlsched_decision. An entry
 * of another generation than model_gen (.bss, bumped on a model reload) is a
 * miss, so a reload drops the old model's decisions at once.
 */
#define MLSCHED_GEN_SHIFT	8

/* What select_cpu does with a candidate whose key has no decision yet. */
enum mlsched_fallback {
	MLSCHED_FALLBACK_KEEP = 0,
	MLSCHED_FALLBACK_MIGRATE = 1,
	MLSCHED_FALLBACK_HEURISTIC = 2, /* migrate when src - dst >= 1/4 of scale */
};

/* Where a candidate was built. */
enum mlsched_path {
	MLSCHED_PATH_WAKEUP = 0,	/* select_cpu: no idle CPU in the task's domain */
	MLSCHED_PATH_STEAL = 1,		/* dispatch: an idle CPU eyes another domain's queue */
};

/*
 * One migration candidate: the task on its current CPU (source domain) and
 * a destination domain. Pushed to the ring buffer on a decision miss, and
 * every time in collection mode.
 */
struct mlsched_candidate {
	__u64 key;		/* packed quantized features, see above */
	__u64 ts_ns;		/* bpf_ktime_get_ns() when submitted */
	__u32 pid;		/* the task */
	__u32 cpu;		/* the CPU it is on (wakeup: last ran on) */
	__u32 cpu_idle;		/* idle CPUs in the destination domain */
	__u32 cpu_not_idle;	/* busy CPUs in the source domain */
	__u32 src_dom;		/* the previous CPU's domain */
	__u32 dst_dom;		/* wakeup: least loaded other domain; steal: the taker's */
	__u32 src_load_q;	/* source domain load, 0..LOAD_SCALE */
	__u32 dst_load_q;	/* destination domain load, 0..LOAD_SCALE */
	__u32 action;		/* enum mlsched_decision applied to this wakeup */
	__u32 source;		/* enum mlsched_source: who chose the action */
	__u32 path;		/* enum mlsched_path */
	__u32 prob_q16;		/* P(logging policy took action), 1/65536 units */
};

/* Who chose a candidate's action (recorded in collection mode). */
enum mlsched_source {
	MLSCHED_SRC_MODEL = 0,		/* a decision-map hit */
	MLSCHED_SRC_FALLBACK = 1,	/* the fallback policy */
	MLSCHED_SRC_EXPLORE = 2,	/* a coin flip (collection mode) */
};

/*
 * Kernel-side counters: per-CPU array "counters", events since attach.
 * Migrations are counted twice: by the decision that caused them (MIGR_*)
 * and as seen when the task next runs on another CPU (RAN_*), so user space
 * can tell how many cross-domain moves a decision made.
 */
enum mlsched_counter {
	MLSCHED_CNT_SELECT = 0,		/* select_cpu calls (wakeups) */
	MLSCHED_CNT_LOCAL,		/* wakeups that found their previous CPU idle */
	MLSCHED_CNT_NO_CANDIDATE,	/* wakeups with no idle CPU and no less loaded domain */
	MLSCHED_CNT_CANDIDATES,		/* migration candidates built, wakeup and steal */
	MLSCHED_CNT_HITS,		/* candidates whose key had a decision */
	MLSCHED_CNT_MISSES,		/* candidates with no decision yet */
	MLSCHED_CNT_MIGRATE,		/* hits the model said to migrate */
	MLSCHED_CNT_KEEP,		/* hits the model said to keep */
	MLSCHED_CNT_FALLBACK_MIGRATE,	/* misses the fallback migrated */
	MLSCHED_CNT_FALLBACK_KEEP,	/* misses the fallback kept */
	MLSCHED_CNT_SUBMITTED,		/* candidates pushed to the ring buffer */
	MLSCHED_CNT_RB_DROPS,		/* ring buffer full: candidate not pushed */
	MLSCHED_CNT_STEAL_CANDIDATES,	/* candidates built on the steal path */
	MLSCHED_CNT_MIGR_MODEL,		/* cross-domain moves a model decision made */
	MLSCHED_CNT_MIGR_FALLBACK,	/* cross-domain moves the fallback (or a coin) made */
	MLSCHED_CNT_MIGR_FORCED,	/* steals of a task queued past the starvation guard */
	MLSCHED_CNT_MIGR_DOMAIN,	/* moves inside a domain: idle sibling on wakeup, or a pull */
	MLSCHED_CNT_RAN_CROSS,		/* task ran on a CPU of another domain than last time */
	MLSCHED_CNT_RAN_DOMAIN,		/* task ran on another CPU of the same domain */
	MLSCHED_CNT_PREEMPTS,		/* woken tasks that preempted a task far ahead in vtime */
	MLSCHED_CNT_RESTRICTED,		/* wakeups of tasks that may not use all of their domain */
	MLSCHED_CNT_EXPLORED,		/* candidates decided by a coin flip (collection) */
	MLSCHED_CNT_LOADER_WAKEUPS,	/* wakeups of the loader's reader, run ahead of the queue */
	MLSCHED_CNT_KINFER,		/* in-kernel inferences (misses decided by the kernel) */
	MLSCHED_CNT_KINFER_NS,		/* their total time, ns */
	MLSCHED_CNT_RB_WAKEUPS,		/* records submitted with a wakeup of the reader */
	MLSCHED_CNT_RAN_CROSS_DECIDED,	/* RAN_CROSS runs whose move a decision made */
	MLSCHED_NR_COUNTERS,
};

/* Loader-side figures: array "loader_stats", written by user space. */
enum mlsched_loader_stat {
	MLSCHED_LS_BATCHES = 0,		/* model batches run */
	MLSCHED_LS_RECORDS,		/* candidate records read from the ring */
	MLSCHED_LS_DECISIONS,		/* decisions written to the map */
	MLSCHED_LS_MODEL_ERRORS,	/* batches whose decisions were not written */
	MLSCHED_LS_BATCH_NS_SUM,	/* model time summed over batches, ns */
	MLSCHED_LS_BATCH_NS_MAX,	/* slowest batch, ns */
	MLSCHED_LS_MODEL_READY,		/* 1 once the model serves, else 0 */
	MLSCHED_LS_BACKEND,		/* enum mlsched_backend of the model */
	MLSCHED_LS_START_NS,		/* CLOCK_MONOTONIC ns when the loader attached */
	MLSCHED_LS_LOADER_PID,		/* pid of the loader */
	MLSCHED_LS_EV_LAT_NS_SUM,	/* event ts -> decision in map, summed, ns */
	MLSCHED_LS_TABLE_ENTRIES,	/* distinct keys the loader has decided */
	MLSCHED_LS_RESTARTS,		/* re-attaches after a CPU hotplug exit */
	MLSCHED_LS_RELOADS,		/* models switched in on SIGHUP */
	MLSCHED_LS_RELOAD_FAILURES,	/* SIGHUPs whose new model was refused */
	MLSCHED_LS_MODEL_DIGEST,	/* first 8 bytes of the serving model's sha256, big-endian */
	MLSCHED_LS_GRID_KEYS,		/* keys in the dense grid (0: the hash serves) */
	MLSCHED_LS_GRID_DECIDED,	/* grid keys holding a decision */
	MLSCHED_NR_LOADER_STATS,
};

enum mlsched_backend {
	MLSCHED_BACKEND_NONE = 0,	/* model not loaded yet: fallback serves */
	MLSCHED_BACKEND_TF = 1,
	MLSCHED_BACKEND_NUMPY = 2,
	MLSCHED_BACKEND_KERNEL = 3,	/* --inference kernel: the scheduler evaluates the model */
};

/*
 * In-kernel inference (--inference kernel): the model's Dense stack in fixed
 * point, array "mlp_weights" of two slots written by user space; the slot of
 * model_gen & 1 serves while its generation equals model_gen (.bss)
 * (a reload fills the other slot, then bumps the generation). Values are
 * Q16.16: x * 2^MLP_FRAC_BITS rounded. Each layer computes
 * out[j] = act(((sum_i w[i][j] * in[i]) >> FRAC_BITS) + b[j]) over the inputs rounded up to 16
 * (weights past nr_in must be zero), in s64, clamped
 * to s32; the final unit's value z says migrate when z > 0 (OUT_LOGIT: the
 * logit of a sigmoid) or z > 0.5 (OUT_LINEAR). loader/kernel_mlp.py mirrors
 * the arithmetic exactly.
 */
#define MLSCHED_MLP_MAX_LAYERS	3
#define MLSCHED_MLP_MAX_UNITS	64
#define MLSCHED_MLP_FRAC_BITS	16

enum mlsched_mlp_act {
	MLSCHED_MLP_LINEAR = 0,
	MLSCHED_MLP_RELU = 1,
};

enum mlsched_mlp_out {
	MLSCHED_MLP_OUT_LOGIT = 0,	/* the last layer's sigmoid dropped: migrate when z > 0 */
	MLSCHED_MLP_OUT_LINEAR = 1,	/* a linear output: migrate when z > 0.5 */
};

struct mlsched_mlp {
	__u32 generation;	/* the model_gen this slot serves */
	__u32 nr_layers;	/* 1..MLP_MAX_LAYERS */
	__u32 out_rule;		/* enum mlsched_mlp_out */
	__u32 nr_in[MLSCHED_MLP_MAX_LAYERS];
	__u32 nr_out[MLSCHED_MLP_MAX_LAYERS];
	__u32 act[MLSCHED_MLP_MAX_LAYERS];	/* enum mlsched_mlp_act of hidden layers */
	__s32 weight[MLSCHED_MLP_MAX_LAYERS][MLSCHED_MLP_MAX_UNITS][MLSCHED_MLP_MAX_UNITS];
	__s32 bias[MLSCHED_MLP_MAX_LAYERS][MLSCHED_MLP_MAX_UNITS];
};

/* Per-domain live state: array "dom_stats", read by user space. */
struct mlsched_dom_stat {
	__u32 nr_cpus;		/* CPUs in the domain */
	__u32 load_q;		/* load at the last refresh, 0..LOAD_SCALE */
	__u64 queued;		/* tasks queued on the domain's CPUs at the last refresh */
};

/*
 * Latency histograms: array "latency_hist" of u64 counts, written by the
 * loader. Row h (enum mlsched_hist) occupies indices h * HIST_BUCKETS + b;
 * bucket b counts latencies in [2^b, 2^(b+1)) ns (bucket 0 also holds 0 ns,
 * the last bucket everything above).
 */
#define MLSCHED_HIST_BUCKETS	40
enum mlsched_hist {
	MLSCHED_HIST_BATCH = 0,		/* model call + map update per batch */
	MLSCHED_HIST_EVENT,		/* candidate's BPF timestamp -> decision in map */
	MLSCHED_NR_HISTS,
};

/* The ring buffer holding struct mlsched_candidate records. */
#define MLSCHED_RINGBUF_DEFAULT_BYTES	(1u << 20)

#endif /* __MLSCHED_H */
