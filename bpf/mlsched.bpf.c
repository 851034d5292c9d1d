/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlsched - a sched_ext scheduler whose task-migration decisions come from a
 * neural network run in user space.
 *
 * CPUs are split into domains (LLCs, or equal slices set by the loader). Every
 * CPU has its own dispatch queue ordered by weighted virtual time, so a task
 * stays on the CPU it last ran on: a wakeup goes back to its previous CPU when
 * that CPU is idle, else to an idle CPU of its domain; a CPU with nothing
 * queued pulls from the busiest sibling of its domain first.
 *
 * Every move across domains asks the same question through the same table:
 *  - on wakeup, when the task's domain has no idle CPU and another domain is
 *    less loaded;
 *  - on a steal, when a CPU has nothing to run in its domain and eyes the head
 *    of another domain's busiest queue.
 * The candidate's five features (the task's CPU, idle CPUs of the destination,
 * busy CPUs of the source, both domains' loads) are quantized into a key and
 * looked up in the "decisions" map that user space fills. A hit is applied; a
 * miss is served by the fallback policy and pushed, once per key, to the
 * "candidates" ring buffer for the model to decide. "Keep" on a steal leaves
 * the task where it is, unless it has waited past the starvation guard
 * (starve_ns), when it moves regardless and counts as forced.
 *
 * Domain loads are refreshed off the wakeup path, at most once per
 * REFRESH_NS per domain, from ops.tick and ops.update_idle; select_cpu only
 * reads them. A woken task whose vtime is a minimum slice behind the task
 * running on its CPU preempts it, and slices shrink as a CPU's queue grows, so wakeups do
 * not wait behind CPU hogs.
 *
 * The kernel never waits for user space: misses use the fallback and a full
 * ring buffer only counts a drop. CPU hotplug ends the scheduler with a
 * restart code; the loader plans the domains again and re-attaches.
 * Limits: vtime is one clock for all CPUs (roughly fair, not exactly); the
 * domain loads a candidate sees may be REFRESH_NS old.
 */
#include <scx/common.bpf.h>
#include "mlsched.h"
#include "mlsched_policy.h"
#include "mlsched_mlp.h"
#include "mlsched_maps.bpf.h"

char _license[] SEC("license") = "GPL";

/* Custom DSQ ids: one per CPU, clear of the builtin-DSQ flag bit. */
#define CPU_DSQ(cpu)		(0x10000ULL + (cpu))
#define WATCHDOG_TIMEOUT_MS	5000
/* Domain loads and the domain ranking are recomputed at most this often. */
#define REFRESH_NS		(1000ULL * 1000)
/* The starvation guard's default (starve_ns' initialiser): four default slices. */
#define STARVE_NS_DFL		(80ULL * 1000 * 1000)

/*
 * The dense decision grid (see mlsched.h): byte i = key i's enum
 * mlsched_grid_code; max_entries (u64 words) set by the loader, mmapped there.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, u64);
} decision_grid SEC(".maps");

/* Decision key -> ns when last pushed: one push per key until it is decided. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, u64);
	__type(value, u64);
} pending SEC(".maps");

/* Event counts since attach, per CPU, indexed by enum mlsched_counter. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MLSCHED_NR_COUNTERS);
	__type(key, u32);
	__type(value, u64);
} counters SEC(".maps");

/* Loader-side figures, indexed by enum mlsched_loader_stat; only user space writes. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_NR_LOADER_STATS);
	__type(key, u32);
	__type(value, u64);
} loader_stats SEC(".maps");

/* Latency histograms of the loader, see enum mlsched_hist; only user space writes. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_NR_HISTS * MLSCHED_HIST_BUCKETS);
	__type(key, u32);
	__type(value, u64);
} latency_hist SEC(".maps");

/* Per-domain CPU count, load (0..LOAD_SCALE) and queue depth, for user space. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_DOMS);
	__type(key, u32);
	__type(value, struct mlsched_dom_stat);
} dom_stats SEC(".maps");

/*
 * Kernel-private per-domain state. The load fields are written only by a
 * refresh (tick or update_idle, rate-limited) and read by select_cpu and
 * dispatch: the wakeup path never stores into them.
 */
struct dom_ctx {
	struct bpf_cpumask __kptr *cpus;
	u64 refreshed_at;	/* ns of the last refresh, claimed by cmpxchg */
	u32 first;		/* index of the domain's first CPU in cpu_order[] */
	u32 nr_cpus;
	u32 nr_idle;		/* idle CPUs at the last refresh */
	u32 load_q;		/* 0..LOAD_SCALE at the last refresh */
	u32 queued;		/* tasks queued on its CPUs at the last refresh */
	u32 deepest;		/* its CPU with the most queued tasks */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_DOMS);
	__type(key, u32);
	__type(value, struct dom_ctx);
} dom_ctxs SEC(".maps");

/* Kernel-private per-CPU state, read by other CPUs (wakeup preemption): not per-CPU. */
struct cpu_ctx {
	u64 run_vtime;		/* dsq_vtime of the task running here */
	u64 dispatches;		/* ops.dispatch calls here */
	u8 pad[48];		/* one cache line per CPU */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_CPUS);
	__type(key, u32);
	__type(value, struct cpu_ctx);
} cpu_ctxs SEC(".maps");

/* Per-task state. */
struct task_ctx {
	u64 started_at;		/* ns it last started running: its vtime charge */
	u64 queued_at;		/* ns it was last queued: the starvation guard */
	u64 full_doms;		/* bit d: may run on every CPU of domain d (set_cpumask) */
	s32 last_cpu;		/* CPU it last ran on, -1 before its first run */
	u32 decided_move;	/* 1: a decision (model or fallback) sent it to another domain */
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ctx);
} task_ctxs SEC(".maps");

/*
 * Never used: these make the contract types appear in the object's BTF, where
 * tests/host/test_contract.py compares them with loader/contract.py.
 */
struct mlsched_candidate contract_btf_candidate;
enum mlsched_decision contract_btf_decision;
enum mlsched_fallback contract_btf_fallback;
enum mlsched_counter contract_btf_counter;
enum mlsched_loader_stat contract_btf_loader_stat;
enum mlsched_backend contract_btf_backend;
enum mlsched_hist contract_btf_hist;
enum mlsched_source contract_btf_source;
enum mlsched_path contract_btf_path;
enum mlsched_grid_code contract_btf_grid_code;
enum mlsched_mlp_act contract_btf_mlp_act;
enum mlsched_mlp_out contract_btf_mlp_out;
struct mlsched_mlp contract_btf_mlp;

/*
 * Set by the loader before load (const volatile: the verifier sees constants
 * and drops the paths a run does not use); the initialisers are the defaults.
 */
const volatile u32 nr_cpus = 1;		/* CPUs the domains cover */
const volatile u32 nr_doms = 1;		/* scheduling domains */
const volatile u32 cpu_dom[MLSCHED_MAX_CPUS];	/* CPU -> its domain */
const volatile u32 fallback_policy = MLSCHED_FALLBACK_HEURISTIC;	/* enum mlsched_fallback */
const volatile u64 slice_ns = 20ULL * 1000 * 1000;	/* the full slice, ns */
const volatile u64 slice_min_ns = 1000ULL * 1000;	/* the slice of a deep queue, ns (<= slice_ns) */
const volatile u64 starve_ns = STARVE_NS_DFL;	/* queued longer: stolen regardless, ns */
/* Ring wakeups (mlsched_ring_wake): wake the reader at this many bytes or this wait. */
const volatile u64 ring_wake_bytes = 64 * sizeof(struct mlsched_candidate);
const volatile u64 ring_max_wait_ns = 2ULL * 1000 * 1000;
/* A pending candidate is pushed again when its decision has not come by then, ns. */
const volatile u64 resubmit_ns = 1000ULL * 1000 * 1000;
/*
 * Collection mode (mlsched-collect): the decision map is ignored; the
 * fallback decides, or a coin flip with probability explore / 65536, and
 * every candidate is pushed with its action so that both actions are seen.
 */
const volatile bool collect;
const volatile u32 explore;
/* The dense grid's bounds (grid_cpus = 0: no grid, the hash serves). */
const volatile u32 grid_cpus, grid_dom_cpus;
/* --inference kernel: a miss is decided here, by the weights in mlp_weights. */
const volatile bool kernel_inference;
/*
 * The loader's ring reader turns candidates into decisions: when it wakes it
 * runs ahead of the queue, or the decisions it owes wait behind a full slice
 * of every CPU hog. Only that thread: the model's thread pools take turns.
 */
const volatile u32 loader_tid;

/* Generation of the serving model: the loader bumps it (mmapped .bss) on a reload. */
u32 model_gen;
/* Start of the run of unread ring records, ns (0: none waiting). */
static u64 ring_oldest_ns;
/* Why the scheduler left, with the kernel's debug dump (scx's UEI). */
UEI_DEFINE(uei);

/* One vtime clock for all CPUs, so a migrated task keeps its place. */
static u64 vtime_now;
/* CPUs sorted by domain: domain d owns cpu_order[first .. first + nr_cpus). */
static u32 cpu_order[MLSCHED_MAX_CPUS];
/* Domain ranking at the last refresh, read by select_cpu and dispatch. */
static u32 least_dom, second_dom;	/* the two least loaded domains */
static u32 busiest_dom, second_busiest;	/* the two with the most queued tasks */
static u64 ranked_at;			/* ns of the last ranking, claimed by cmpxchg */

static __always_inline void cnt_inc(u32 idx)
{
	u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		(*c)++;
}

_Static_assert(!(MLSCHED_MAX_CPUS & (MLSCHED_MAX_CPUS - 1)), "MAX_CPUS masks array indices");

static __always_inline u32 dom_of(s32 cpu)
{
	u32 d;

	if (cpu < 0 || cpu >= MLSCHED_MAX_CPUS)
		return 0;
	/* The mask repeats the bound in the register the load uses (MAX_CPUS: a power of 2). */
	d = cpu_dom[cpu & (MLSCHED_MAX_CPUS - 1)];
	return d < nr_doms ? d : 0;
}

static __always_inline struct dom_ctx *dom_get(u32 dom)
{
	struct dom_ctx *dc = bpf_map_lookup_elem(&dom_ctxs, &dom);

	if (!dc)
		scx_bpf_error("no dom_ctx for domain %u", dom);
	return dc;
}

static __always_inline struct cpu_ctx *cpu_ctx_get(s32 cpu)
{
	u32 key = cpu;
	struct cpu_ctx *cc = bpf_map_lookup_elem(&cpu_ctxs, &key);

	if (!cc)
		scx_bpf_error("no cpu_ctx for CPU %d", cpu);
	return cc;
}

/* The i-th CPU of a domain in cpu_order, -1 past the array. */
static __always_inline s32 dom_cpu(struct dom_ctx *dc, u32 i)
{
	u32 idx = dc->first + i;

	return idx < MLSCHED_MAX_CPUS ? cpu_order[idx & (MLSCHED_MAX_CPUS - 1)] : -1;
}

static __always_inline struct task_ctx *task_get(struct task_struct *p)
{
	return bpf_task_storage_get(&task_ctxs, p, NULL, 0);
}

static __always_inline bool is_loader(struct task_struct *p)
{
	return loader_tid && p->pid == loader_tid;
}

/* May the task run on every CPU of this domain? Cached by set_cpumask. */
static __always_inline bool full_in(struct task_ctx *tc, u32 dom)
{
	return tc && dom < 64 && (tc->full_doms & (1ULL << dom));
}

/* --- domain loads, refreshed off the wakeup path ------------------------------------------ */

/* Recompute one domain's idle CPUs, queue depth and load; returns false if unclaimed. */
static bool refresh_dom(u32 dom, u64 now)
{
	struct mlsched_dom_stat *ds = bpf_map_lookup_elem(&dom_stats, &dom);
	struct dom_ctx *dc = dom_get(dom);
	const struct cpumask *idle;
	u32 i, idle_cnt = 0, queued = 0, most = 0, deepest = 0, busy;
	u64 last;

	if (!dc || !ds)
		return false;
	last = dc->refreshed_at;
	if (now - last < REFRESH_NS || !__sync_bool_compare_and_swap(&dc->refreshed_at, last, now))
		return false;

	idle = scx_bpf_get_idle_cpumask();
	bpf_for(i, 0, dc->nr_cpus) {
		s32 q, cpu = dom_cpu(dc, i);

		if (cpu < 0)
			break;
		if (bpf_cpumask_test_cpu(cpu, idle))
			idle_cnt++;
		q = scx_bpf_dsq_nr_queued(CPU_DSQ(cpu));
		if (q > 0) {
			queued += q;
			if (q > most) {
				most = q;
				deepest = cpu;
			}
		}
	}
	scx_bpf_put_idle_cpumask(idle);

	busy = idle_cnt >= dc->nr_cpus ? 0 : dc->nr_cpus - idle_cnt;
	dc->nr_idle = idle_cnt;
	dc->queued = queued;
	dc->deepest = deepest;
	dc->load_q = mlsched_load_q(busy + queued, dc->nr_cpus);
	ds->load_q = dc->load_q;
	ds->queued = queued;
	return true;
}

/* Rank the domains by load and by queue depth: O(domains), at most once per REFRESH_NS. */
static void rank_doms(u64 now)
{
	u32 d, least = 0, second = 0, busiest = 0, second_b = 0;
	u32 least_load = MLSCHED_LOAD_SCALE + 1, second_load = MLSCHED_LOAD_SCALE + 1;
	s64 most = -1, second_most = -1;
	u64 last = ranked_at;

	if (now - last < REFRESH_NS || !__sync_bool_compare_and_swap(&ranked_at, last, now))
		return;
	bpf_for(d, 0, nr_doms) {
		struct dom_ctx *dc = dom_get(d);

		if (!dc)
			return;
		if (dc->load_q < least_load) {
			second = least;
			second_load = least_load;
			least = d;
			least_load = dc->load_q;
		} else if (dc->load_q < second_load) {
			second = d;
			second_load = dc->load_q;
		}
		if ((s64)dc->queued > most) {
			second_b = busiest;
			second_most = most;
			busiest = d;
			most = dc->queued;
		} else if ((s64)dc->queued > second_most) {
			second_b = d;
			second_most = dc->queued;
		}
	}
	least_dom = least;
	second_dom = second;
	busiest_dom = busiest;
	second_busiest = second_b;
}

static __always_inline void refresh(s32 cpu)
{
	u64 now = bpf_ktime_get_ns();

	refresh_dom(dom_of(cpu), now);
	rank_doms(now);
}

/* --- decisions ------------------------------------------------------------------------------ */

/* Push a candidate record; false when the ring buffer is full (counted). */
static __always_inline bool push(struct mlsched_candidate *c, u64 now)
{
	struct mlsched_candidate *rec;
	u64 avail = bpf_ringbuf_query(&candidates, BPF_RB_AVAIL_DATA);
	bool wake;

	rec = bpf_ringbuf_reserve(&candidates, sizeof(*rec), 0);
	if (!rec) {
		cnt_inc(MLSCHED_CNT_RB_DROPS);
		return false;
	}
	*rec = *c;
	rec->ts_ns = now;
	/* Racy across CPUs but contained: at worst one wakeup early or one max-wait late. */
	wake = mlsched_ring_wake(avail, sizeof(*rec), now, &ring_oldest_ns, ring_wake_bytes,
				 ring_max_wait_ns);
	if (wake)
		cnt_inc(MLSCHED_CNT_RB_WAKEUPS);
	bpf_ringbuf_submit(rec, wake ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	cnt_inc(MLSCHED_CNT_SUBMITTED);
	return true;
}

/* Push a candidate for the model, once per key until its decision arrives. */
static __always_inline void submit_once(struct mlsched_candidate *c)
{
	u64 now = bpf_ktime_get_ns();
	u64 *last;

	last = bpf_map_lookup_elem(&pending, &c->key);
	if (last && now - *last < resubmit_ns)
		return;
	bpf_map_update_elem(&pending, &c->key, &now, BPF_ANY);
	/* On a drop, forget the key so that the next miss tries again. */
	if (!push(c, now))
		bpf_map_delete_elem(&pending, &c->key);
}

static __always_inline bool fallback_migrate(struct mlsched_candidate *c)
{
	switch (fallback_policy) {
	case MLSCHED_FALLBACK_MIGRATE:
		return true;
	case MLSCHED_FALLBACK_HEURISTIC:
		return mlsched_heuristic(c->src_load_q, c->dst_load_q, c->cpu_idle);
	default:
		return false;
	}
}

/* Fill a candidate's features from the domains' last refresh. */
static __always_inline bool build(struct mlsched_candidate *c, struct task_struct *p, s32 cpu,
				  u32 src, u32 dst, u32 path)
{
	struct dom_ctx *sc = dom_get(src), *dc = dom_get(dst);

	if (!sc || !dc)
		return false;
	c->pid = p->pid;
	c->cpu = cpu;
	c->src_dom = src;
	c->dst_dom = dst;
	c->src_load_q = sc->load_q;
	c->dst_load_q = dc->load_q;
	c->cpu_not_idle = sc->nr_idle >= sc->nr_cpus ? 0 : sc->nr_cpus - sc->nr_idle;
	c->cpu_idle = dc->nr_idle;
	/* A stealing CPU is about to go idle: it counts, even if the refresh missed it. */
	if (path == MLSCHED_PATH_STEAL && !c->cpu_idle)
		c->cpu_idle = 1;
	c->cpu_idle = mlsched_clamp_field(c->cpu_idle);
	c->cpu_not_idle = mlsched_clamp_field(c->cpu_not_idle);
	c->path = path;
	c->key = mlsched_pack_key(c->cpu, c->cpu_idle, c->cpu_not_idle, c->src_load_q,
				  c->dst_load_q);
	cnt_inc(MLSCHED_CNT_CANDIDATES);
	if (path == MLSCHED_PATH_STEAL)
		cnt_inc(MLSCHED_CNT_STEAL_CANDIDATES);
	return true;
}

static __always_inline s64 grid_index(struct mlsched_candidate *c)
{
	if (!grid_cpus)
		return -1;
	return mlsched_grid_index(grid_cpus, grid_dom_cpus, c->cpu, c->cpu_idle, c->cpu_not_idle,
				  c->src_load_q, c->dst_load_q);
}

/* The table's answer for a candidate, as an enum mlsched_grid_code. */
static __always_inline u32 lookup_decision(struct mlsched_candidate *c)
{
	s64 gi = grid_index(c);
	u64 *word;
	u32 *v, w;

	if (gi >= 0) {
		w = gi >> 3;
		word = bpf_map_lookup_elem(&decision_grid, &w);
		return word ? (*word >> ((gi & 7) * 8)) & 0xff : MLSCHED_GRID_UNDECIDED;
	}
	v = bpf_map_lookup_elem(&decisions, &c->key);
	/* An entry of an older model's generation is a miss. */
	if (!v || (*v >> MLSCHED_GEN_SHIFT) != model_gen)
		return MLSCHED_GRID_UNDECIDED;
	return (*v & 0xff) == MLSCHED_MIGRATE ? MLSCHED_GRID_MIGRATE : MLSCHED_GRID_KEEP;
}

/*
 * --inference kernel: decide a miss with the weights of the serving
 * generation and keep the answer in the table. Returns -1 without weights.
 */
static __always_inline int kernel_decide(struct mlsched_candidate *c)
{
	u32 gen = model_gen, w, v;
	u64 t0 = bpf_ktime_get_ns(), *word, *ns;
	s64 gi;
	int r;

	r = mlp_decide(gen & 1, gen, c->key);
	if (r < 0)
		return r;
	cnt_inc(MLSCHED_CNT_KINFER);
	w = MLSCHED_CNT_KINFER_NS;
	ns = bpf_map_lookup_elem(&counters, &w);
	if (ns)
		*ns += bpf_ktime_get_ns() - t0;
	gi = grid_index(c);
	if (gi >= 0) {
		w = gi >> 3;
		word = bpf_map_lookup_elem(&decision_grid, &w);
		/* One byte of the word: user space only clears whole generations. */
		if (word)
			*((u8 *)word + (gi & 7)) = r ? MLSCHED_GRID_MIGRATE : MLSCHED_GRID_KEEP;
	} else {
		v = (gen << MLSCHED_GEN_SHIFT) | (r ? MLSCHED_MIGRATE : MLSCHED_KEEP);
		bpf_map_update_elem(&decisions, &c->key, &v, BPF_ANY);
	}
	return r;
}

/*
 * The one decision for every cross-domain move: sets c->action and c->source.
 * Inlined: with mlp_decide() below it, separate frames overflow the 512-byte stack.
 */
static __always_inline bool decide(struct mlsched_candidate *c)
{
	bool migrate, fb;
	u32 code;

	if (collect) {
		fb = fallback_migrate(c);
		if (explore && (bpf_get_prandom_u32() % MLSCHED_EXPLORE_SCALE) < explore) {
			migrate = bpf_get_prandom_u32() & 1;
			c->source = MLSCHED_SRC_EXPLORE;
			cnt_inc(MLSCHED_CNT_EXPLORED);
		} else {
			migrate = fb;
			c->source = MLSCHED_SRC_FALLBACK;
		}
		cnt_inc(migrate ? MLSCHED_CNT_FALLBACK_MIGRATE : MLSCHED_CNT_FALLBACK_KEEP);
		c->action = migrate ? MLSCHED_MIGRATE : MLSCHED_KEEP;
		c->prob_q16 = mlsched_propensity_q16(explore, fb, migrate);
		push(c, bpf_ktime_get_ns());
		return migrate;
	}

	code = lookup_decision(c);
	if (code != MLSCHED_GRID_UNDECIDED) {
		cnt_inc(MLSCHED_CNT_HITS);
		migrate = code == MLSCHED_GRID_MIGRATE;
		cnt_inc(migrate ? MLSCHED_CNT_MIGRATE : MLSCHED_CNT_KEEP);
		c->source = MLSCHED_SRC_MODEL;
		c->action = migrate ? MLSCHED_MIGRATE : MLSCHED_KEEP;
		return migrate;
	}
	cnt_inc(MLSCHED_CNT_MISSES);
	if (kernel_inference) {
		int r = kernel_decide(c);

		if (r >= 0) {
			c->source = MLSCHED_SRC_MODEL;
			c->action = r ? MLSCHED_MIGRATE : MLSCHED_KEEP;
			cnt_inc(r ? MLSCHED_CNT_MIGRATE : MLSCHED_CNT_KEEP);
			return r;
		}
	}
	migrate = fallback_migrate(c);
	cnt_inc(migrate ? MLSCHED_CNT_FALLBACK_MIGRATE : MLSCHED_CNT_FALLBACK_KEEP);
	c->action = migrate ? MLSCHED_MIGRATE : MLSCHED_KEEP;
	c->source = MLSCHED_SRC_FALLBACK;
	c->prob_q16 = MLSCHED_EXPLORE_SCALE;
	submit_once(c);
	return migrate;
}

static __always_inline void count_move(struct mlsched_candidate *c)
{
	cnt_inc(c->source == MLSCHED_SRC_MODEL ? MLSCHED_CNT_MIGR_MODEL : MLSCHED_CNT_MIGR_FALLBACK);
}

/* --- ops ------------------------------------------------------------------------------------ */

s32 BPF_STRUCT_OPS(mlsched_select_cpu, struct task_struct *p, s32 prev_cpu, u64 wake_flags)
{
	struct mlsched_candidate c = {};
	struct task_ctx *tc = task_get(p);
	const struct cpumask *mask;
	struct dom_ctx *sd, *dd;
	u32 src, dst;
	s32 cpu;

	cnt_inc(MLSCHED_CNT_SELECT);
	src = dom_of(prev_cpu);

	/* The loader, and tasks that may not use all of their domain: the kernel's choice. */
	if (is_loader(p) || !full_in(tc, src)) {
		bool is_idle = false;

		if (!is_loader(p))
			cnt_inc(MLSCHED_CNT_RESTRICTED);
		cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
		if (is_idle)
			scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		return cpu;
	}

	/* Stay on the previous CPU when it is idle, else on an idle CPU of the domain. */
	if (scx_bpf_test_and_clear_cpu_idle(prev_cpu)) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		cnt_inc(MLSCHED_CNT_LOCAL);
		return prev_cpu;
	}
	sd = dom_get(src);
	mask = sd ? (const struct cpumask *)sd->cpus : NULL;
	if (!mask)
		return prev_cpu;
	cpu = scx_bpf_pick_idle_cpu(mask, 0);
	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		cnt_inc(MLSCHED_CNT_MIGR_DOMAIN);
		return cpu;
	}

	/* No idle CPU at home: the least loaded other domain the task may fully use. */
	dst = least_dom == src ? second_dom : least_dom;
	dd = dom_get(dst);
	if (!dd || dst == src || dd->load_q >= sd->load_q || !full_in(tc, dst)) {
		cnt_inc(MLSCHED_CNT_NO_CANDIDATE);
		return prev_cpu;
	}
	if (!build(&c, p, prev_cpu, src, dst, MLSCHED_PATH_WAKEUP) || !decide(&c))
		return prev_cpu;

	mask = (const struct cpumask *)dd->cpus;
	if (!mask)
		return prev_cpu;
	cpu = scx_bpf_pick_idle_cpu(mask, 0);
	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	} else {
		/* No idle CPU there any more: queue on one of its CPUs all the same. */
		cpu = scx_bpf_pick_any_cpu(mask, 0);
		if (cpu < 0)
			return prev_cpu;
	}
	count_move(&c);
	if (tc)
		tc->decided_move = 1;
	return cpu;
}

void BPF_STRUCT_OPS(mlsched_enqueue, struct task_struct *p, u64 enq_flags)
{
	s32 cpu = scx_bpf_task_cpu(p), idle;
	struct task_ctx *tc = task_get(p);
	struct cpu_ctx *cc;
	struct dom_ctx *dc;
	u64 vtime, slice;
	s32 waiting;

	if (is_loader(p) && (enq_flags & SCX_ENQ_WAKEUP)) {
		cnt_inc(MLSCHED_CNT_LOADER_WAKEUPS);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | cpu, slice_ns, enq_flags | SCX_ENQ_HEAD);
		scx_bpf_kick_cpu(cpu, SCX_KICK_PREEMPT);
		return;
	}
	if (tc)
		tc->queued_at = bpf_ktime_get_ns();

	waiting = scx_bpf_dsq_nr_queued(CPU_DSQ(cpu));
	slice = mlsched_slice(slice_ns, slice_min_ns, waiting > 0 ? waiting : 0);
	vtime = mlsched_vtime_clamp(p->scx.dsq_vtime, vtime_now, slice_ns);
	scx_bpf_dsq_insert_vtime(p, CPU_DSQ(cpu), slice, vtime, enq_flags);

	/*
	 * A woken task more than a minimum slice behind the one running on its
	 * CPU (a sleeper behind a hog) preempts it, as EEVDF would.
	 */
	cc = cpu_ctx_get(cpu);
	if ((enq_flags & SCX_ENQ_WAKEUP) && cc && cc->run_vtime &&
	    (s64)(vtime + slice_min_ns - cc->run_vtime) < 0) {
		cnt_inc(MLSCHED_CNT_PREEMPTS);
		scx_bpf_kick_cpu(cpu, SCX_KICK_PREEMPT);
		return;
	}
	if (scx_bpf_test_and_clear_cpu_idle(cpu)) {
		scx_bpf_kick_cpu(cpu, SCX_KICK_IDLE);
		return;
	}
	/* Its CPU is busy: wake an idle sibling to pull it, or any idle CPU to consider a steal. */
	dc = dom_get(dom_of(cpu));
	idle = dc && dc->cpus ? scx_bpf_pick_idle_cpu((const struct cpumask *)dc->cpus, 0) : -1;
	if (idle < 0)
		idle = scx_bpf_pick_idle_cpu(p->cpus_ptr, 0);
	if (idle >= 0)
		scx_bpf_kick_cpu(idle, SCX_KICK_IDLE);
}

/* Pull from the sibling with the deepest queue, inside the domain. */
static bool pull_in_domain(s32 cpu, struct dom_ctx *dc)
{
	u32 i, most = 0;
	s32 from = -1;

	bpf_for(i, 0, dc->nr_cpus) {
		s32 q, sib = dom_cpu(dc, i);

		if (sib < 0)
			break;
		if (sib == cpu)
			continue;
		q = scx_bpf_dsq_nr_queued(CPU_DSQ(sib));
		if (q > most) {
			most = q;
			from = sib;
		}
	}
	if (from < 0 || !scx_bpf_dsq_move_to_local(CPU_DSQ(from), 0))
		return false;
	cnt_inc(MLSCHED_CNT_MIGR_DOMAIN);
	return true;
}

/* Ask about the first task of another domain's deepest queue that may run here. */
static void steal(s32 cpu, u32 home)
{
	struct mlsched_candidate c = {};
	u32 victim = busiest_dom == home ? second_busiest : busiest_dom;
	struct dom_ctx *vd = dom_get(victim);
	struct task_struct *p;
	u64 now = bpf_ktime_get_ns();

	if (!vd || victim == home || !vd->queued)
		return;
	bpf_for_each(scx_dsq, p, CPU_DSQ(vd->deepest), 0) {
		struct task_ctx *tc;
		bool forced;

		if (!bpf_cpumask_test_cpu(cpu, p->cpus_ptr))
			continue;
		tc = task_get(p);
		forced = tc && now - tc->queued_at > starve_ns;
		if (!build(&c, p, vd->deepest, victim, home, MLSCHED_PATH_STEAL))
			break;
		if (forced) {
			cnt_inc(MLSCHED_CNT_MIGR_FORCED);
		} else if (!decide(&c)) {
			break;
		}
		if (scx_bpf_dsq_move(BPF_FOR_EACH_ITER, p, SCX_DSQ_LOCAL, 0) && !forced) {
			count_move(&c);
			if (tc)
				tc->decided_move = 1;
		}
		break;
	}
}

void BPF_STRUCT_OPS(mlsched_dispatch, s32 cpu, struct task_struct *prev)
{
	u32 home = dom_of(cpu);
	struct dom_ctx *dc;

	if (scx_bpf_dsq_move_to_local(CPU_DSQ(cpu), 0))
		return;
	dc = dom_get(home);
	if (!dc)
		return;
	if (pull_in_domain(cpu, dc))
		return;
	steal(cpu, home);
}

void BPF_STRUCT_OPS(mlsched_tick, struct task_struct *p)
{
	refresh(scx_bpf_task_cpu(p));
}

void BPF_STRUCT_OPS(mlsched_running, struct task_struct *p)
{
	s32 cpu = scx_bpf_task_cpu(p);
	struct task_ctx *tc = task_get(p);
	struct cpu_ctx *cc;

	if (tc) {
		tc->started_at = bpf_ktime_get_ns();
		if (tc->last_cpu >= 0 && tc->last_cpu != cpu) {
			if (dom_of(tc->last_cpu) == dom_of(cpu)) {
				cnt_inc(MLSCHED_CNT_RAN_DOMAIN);
			} else {
				cnt_inc(MLSCHED_CNT_RAN_CROSS);
				if (tc->decided_move)
					cnt_inc(MLSCHED_CNT_RAN_CROSS_DECIDED);
			}
		}
		tc->last_cpu = cpu;
		tc->decided_move = 0;
	}
	/* The loader jumps the queue on wakeup: it must not drive the clock. */
	if (is_loader(p))
		return;
	cc = cpu_ctx_get(cpu);
	if (cc)
		cc->run_vtime = p->scx.dsq_vtime;
	/* Racy but contained: vtime_now only moves forward, roughly. */
	if ((s64)(vtime_now - p->scx.dsq_vtime) < 0)
		vtime_now = p->scx.dsq_vtime;
}

void BPF_STRUCT_OPS(mlsched_stopping, struct task_struct *p, bool runnable)
{
	struct task_ctx *tc = task_get(p);
	struct cpu_ctx *cc;

	if (tc)
		p->scx.dsq_vtime += mlsched_vtime_charge(
			mlsched_ran_ns(bpf_ktime_get_ns(), tc->started_at), p->scx.weight);
	cc = cpu_ctx_get(scx_bpf_task_cpu(p));
	if (cc)
		cc->run_vtime = 0;
}

void BPF_STRUCT_OPS(mlsched_update_idle, s32 cpu, bool idle)
{
	refresh(cpu);
}

/* Which domains the task may use whole; O(domains), only when its affinity changes. */
static void set_doms(struct task_ctx *tc, const struct cpumask *allowed)
{
	u64 full = 0;
	u32 d;

	bpf_for(d, 0, nr_doms) {
		struct dom_ctx *dc = dom_get(d);

		if (!dc || !dc->cpus || d >= 64)
			break;
		if (bpf_cpumask_subset((const struct cpumask *)dc->cpus, allowed))
			full |= 1ULL << d;
	}
	tc->full_doms = full;
}

void BPF_STRUCT_OPS(mlsched_set_cpumask, struct task_struct *p, const struct cpumask *cpumask)
{
	struct task_ctx *tc = task_get(p);

	if (tc)
		set_doms(tc, cpumask);
}

s32 BPF_STRUCT_OPS(mlsched_init_task, struct task_struct *p, struct scx_init_task_args *args)
{
	struct task_ctx *tc;

	tc = bpf_task_storage_get(&task_ctxs, p, NULL, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!tc)
		return -ENOMEM;
	tc->last_cpu = -1;
	set_doms(tc, p->cpus_ptr);
	return 0;
}

void BPF_STRUCT_OPS(mlsched_enable, struct task_struct *p)
{
	p->scx.dsq_vtime = vtime_now;
}

/* Add one CPU to its domain's cpumask and queue order; returns 1 (stop) on failure. */
static long add_cpu_cb(u64 cpu, void *data)
{
	struct bpf_cpumask *mask, *old;
	struct mlsched_dom_stat *ds;
	struct dom_ctx *dc;
	u32 d = dom_of(cpu), idx;

	dc = bpf_map_lookup_elem(&dom_ctxs, &d);
	ds = bpf_map_lookup_elem(&dom_stats, &d);
	if (!dc || !ds)
		return 1;
	mask = bpf_kptr_xchg(&dc->cpus, NULL);
	if (!mask)
		mask = bpf_cpumask_create();
	if (!mask)
		return 1;
	bpf_cpumask_set_cpu(cpu, mask);
	old = bpf_kptr_xchg(&dc->cpus, mask);
	if (old)
		bpf_cpumask_release(old);
	idx = dc->first + dc->nr_cpus;
	if (idx >= MLSCHED_MAX_CPUS)
		return 1;
	cpu_order[idx] = cpu;
	dc->nr_cpus++;
	ds->nr_cpus = dc->nr_cpus;
	return 0;
}

s32 BPF_STRUCT_OPS_SLEEPABLE(mlsched_init)
{
	u32 sizes[MLSCHED_MAX_DOMS] = {}, d, cpu, first = 0;
	s32 ret;

	if (!nr_cpus || nr_cpus > MLSCHED_MAX_CPUS || !nr_doms || nr_doms > MLSCHED_MAX_DOMS) {
		scx_bpf_error("bad config: %u cpus, %u domains", nr_cpus, nr_doms);
		return -EINVAL;
	}

	/* Count the CPUs of each domain, so each domain's slice of cpu_order is known. */
	bpf_for(cpu, 0, nr_cpus) {
		d = dom_of(cpu);
		if (d < MLSCHED_MAX_DOMS)
			sizes[d]++;
	}
	bpf_for(d, 0, nr_doms) {
		struct dom_ctx *dc = dom_get(d);

		if (!dc || d >= MLSCHED_MAX_DOMS)
			return -ENOENT;
		dc->first = first;
		first += sizes[d];
	}

	/*
	 * A queue for every possible CPU, not only the planned ones: a CPU that comes online
	 * runs tasks (as domain 0's) until the kernel ends us for the re-attach.
	 */
	bpf_for(d, 0, scx_bpf_nr_cpu_ids()) {
		if (d >= MLSCHED_MAX_CPUS)
			break;
		ret = scx_bpf_create_dsq(CPU_DSQ(d), -1);
		if (ret) {
			scx_bpf_error("failed to create the queue of CPU %u (%d)", d, ret);
			return ret;
		}
	}

	/* Each domain's cpumask and queue order, one CPU a call (a kptr swap per CPU). */
	ret = bpf_loop(nr_cpus, add_cpu_cb, NULL, 0);
	if (ret < 0 || ret != nr_cpus) {
		scx_bpf_error("failed to build the domain cpumasks (%d)", ret);
		return ret < 0 ? ret : -ENOMEM;
	}
	return 0;
}

void BPF_STRUCT_OPS(mlsched_exit, struct scx_exit_info *ei)
{
	UEI_RECORD(uei, ei);
}

SCX_OPS_DEFINE(mlsched_ops,
	       .select_cpu	= (void *)mlsched_select_cpu,
	       .enqueue		= (void *)mlsched_enqueue,
	       .dispatch	= (void *)mlsched_dispatch,
	       .tick		= (void *)mlsched_tick,
	       .running		= (void *)mlsched_running,
	       .stopping	= (void *)mlsched_stopping,
	       .update_idle	= (void *)mlsched_update_idle,
	       .set_cpumask	= (void *)mlsched_set_cpumask,
	       .init_task	= (void *)mlsched_init_task,
	       .enable		= (void *)mlsched_enable,
	       .init		= (void *)mlsched_init,
	       .exit		= (void *)mlsched_exit,
	       /* update_idle is ours, but pick_idle_cpu needs the kernel's tracking too. */
	       .flags		= SCX_OPS_KEEP_BUILTIN_IDLE,
	       .timeout_ms	= WATCHDOG_TIMEOUT_MS,
	       .name		= "mlsched");
