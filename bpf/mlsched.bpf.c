/* SPDX-License-Identifier: GPL-2.0 */
/*
 * mlsched - a sched_ext scheduler whose task-migration decisions come from a
 * neural network run in user space.
 *
 * CPUs are split into domains (LLCs, or equal slices set by the loader); each
 * domain has one dispatch queue ordered by weighted virtual time, and a CPU
 * whose domain queue is empty steals from the busiest other domain. On wakeup, a task whose previous
 * domain has an idle CPU stays there. Otherwise, when another domain is less
 * loaded, the wakeup is a migration candidate: its features are quantized into
 * a key and looked up in the "decisions" map that user space fills. A hit is
 * applied (migrate = a CPU of the less loaded domain). A miss is served by the
 * fallback policy and the candidate is pushed, once per key, to the
 * "candidates" ring buffer for the model to decide.
 *
 * The kernel never waits for user space: misses use the fallback and a full
 * ring buffer only counts a drop. Good for experimenting with learned
 * migration policies on machines with a few domains; there is no load
 * balancing beyond wakeup placement and idle stealing, and vtime is only
 * roughly fair across domains.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "mlsched.h"

char _license[] SEC("license") = "GPL";

/* sched_ext and cpumask kfuncs (declared here; the kernel's BTF checks them). */
s32 scx_bpf_create_dsq(u64 dsq_id, s32 node) __ksym;
void scx_bpf_dsq_insert(struct task_struct *p, u64 dsq_id, u64 slice, u64 enq_flags) __ksym;
bool scx_bpf_dsq_move_to_local(u64 dsq_id) __ksym;
/* 7.x passes the vtime insert's arguments in a struct (kfuncs take at most 5). */
bool __scx_bpf_dsq_insert_vtime(struct task_struct *p,
				struct scx_bpf_dsq_insert_vtime_args *args) __ksym;
s32 scx_bpf_dsq_nr_queued(u64 dsq_id) __ksym;
s32 scx_bpf_pick_idle_cpu(const struct cpumask *cpus_allowed, u64 flags) __ksym;
s32 scx_bpf_pick_any_cpu(const struct cpumask *cpus_allowed, u64 flags) __ksym;
bool scx_bpf_test_and_clear_cpu_idle(s32 cpu) __ksym;
void scx_bpf_kick_cpu(s32 cpu, u64 flags) __ksym;
s32 scx_bpf_task_cpu(const struct task_struct *p) __ksym;
s32 scx_bpf_select_cpu_dfl(struct task_struct *p, s32 prev_cpu, u64 wake_flags,
			   bool *is_idle) __ksym;
void scx_bpf_error_bstr(char *fmt, unsigned long long *data, u32 data__sz) __ksym;
struct bpf_cpumask *bpf_cpumask_create(void) __ksym;
void bpf_cpumask_release(struct bpf_cpumask *cpumask) __ksym;
void bpf_cpumask_set_cpu(u32 cpu, struct bpf_cpumask *cpumask) __ksym;

/* Report a fatal error: the kernel ejects the scheduler with this message. */
#define mlsched_error(fmt, args...)						\
	({									\
		static char ___fmt[] = fmt;					\
		unsigned long long ___args[] = { args };			\
		scx_bpf_error_bstr(___fmt, ___args, sizeof(___args));		\
	})

#define BPF_STRUCT_OPS(name, args...) SEC("struct_ops/" #name) BPF_PROG(name, ##args)
#define BPF_STRUCT_OPS_SLEEPABLE(name, args...) SEC("struct_ops.s/" #name) BPF_PROG(name, ##args)

/* Custom DSQ ids: small user ids, clear of the builtin-DSQ flag bit. */
#define DOM_DSQ(dom)		(0x100ULL + (dom))
/* Tasks that may not run on every CPU of a domain wait in their CPU's own DSQ. */
#define CPU_DSQ(cpu)		(0x10000ULL + (cpu))
#define WATCHDOG_TIMEOUT_MS	5000
/* How far ahead of the vtime clock a task may be queued, in slices. */
#define VTIME_MAX_LAG_SLICES	4

#define EINVAL	22
#define ENOENT	2
#define ENOMEM	12

/* Ring buffer of struct mlsched_candidate; size set by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MLSCHED_RINGBUF_DEFAULT_BYTES);
} candidates SEC(".maps");

/* Decision key -> enum mlsched_decision, written in batches by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, u64);
	__type(value, u32);
} decisions SEC(".maps");

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

/* Configuration set by the loader before attach, indexed by enum mlsched_config. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_NR_CONFIG);
	__type(key, u32);
	__type(value, u64);
} sched_config SEC(".maps");

/* CPU -> domain, set by the loader before attach. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_CPUS);
	__type(key, u32);
	__type(value, u32);
} cpu_dom SEC(".maps");

/* Per-domain CPU count, load (0..LOAD_SCALE) and DSQ depth, for user space. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_DOMS);
	__type(key, u32);
	__type(value, struct mlsched_dom_stat);
} dom_stats SEC(".maps");

/* Why the scheduler left, written once by ops.exit. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct mlsched_exit_info);
} exit_info SEC(".maps");

/* Kernel-private per-domain state: the domain's CPUs and how many are idle. */
struct dom_ctx {
	struct bpf_cpumask __kptr *cpus;
	u64 nr_idle;		/* idle CPUs in the domain, kept by ops.update_idle */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MLSCHED_MAX_DOMS);
	__type(key, u32);
	__type(value, struct dom_ctx);
} dom_ctxs SEC(".maps");

/* Kernel-private per-CPU state. */
struct cpu_ctx {
	u64 idle;		/* 1 = idle, as last reported by ops.update_idle */
	u64 dispatches;		/* ops.dispatch calls: alternates the queue served first */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, u32);
	__type(value, struct cpu_ctx);
} cpu_ctxs SEC(".maps");

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
enum mlsched_config contract_btf_config;
enum mlsched_hist contract_btf_hist;
enum mlsched_source contract_btf_source;

/* Copied from "sched_config" at init: read on every wakeup. */
static u32 nr_cpus;
static u32 nr_doms;
static u32 fallback_policy;
static u64 slice_ns = SCX_SLICE_DFL;
/* A pending candidate is pushed again when its decision has not come by then. */
static u64 resubmit_ns = 1000ULL * 1000 * 1000;
/*
 * Collection mode (mlsched-collect): the decision map is ignored; the
 * fallback decides, or a coin flip with probability explore / 65536, and
 * every candidate is pushed with its action so that both actions are seen.
 */
static bool collect;
static u32 explore;
/*
 * The loader turns candidates into decisions: when it wakes, it runs ahead
 * of the queue (head of its CPU's local DSQ, preempting), or the decisions
 * it owes wait behind a full slice of every CPU hog. Only wakeups are
 * boosted, so a loader busy computing (importing TensorFlow) takes turns.
 */
static u32 loader_tgid;
/*
 * Domain queues are ordered by weighted virtual time, as in scx_simple: a
 * task that slept comes back ahead of the CPU hogs, which a FIFO would queue
 * it behind. One clock for all domains, so a migrated task keeps its place.
 */
static u64 vtime_now;

static __always_inline void cnt_inc(u32 idx)
{
	u64 *c = bpf_map_lookup_elem(&counters, &idx);

	if (c)
		(*c)++;
}

static __always_inline u64 cfg_get(u32 idx)
{
	u64 *v = bpf_map_lookup_elem(&sched_config, &idx);

	return v ? *v : 0;
}

static __always_inline s32 dom_of(s32 cpu)
{
	u32 key = cpu;
	u32 *d = bpf_map_lookup_elem(&cpu_dom, &key);

	return d && *d < nr_doms ? *d : 0;
}

static __always_inline const struct cpumask *dom_cpus(u32 dom)
{
	struct dom_ctx *dc = bpf_map_lookup_elem(&dom_ctxs, &dom);

	return dc ? (const struct cpumask *)dc->cpus : NULL;
}

/* Load of a domain in 0..LOAD_SCALE: busy CPUs plus queued tasks, per CPU. */
static __always_inline u32 dom_load_q(u32 dom, u32 *busy)
{
	struct mlsched_dom_stat *ds = bpf_map_lookup_elem(&dom_stats, &dom);
	struct dom_ctx *dc = bpf_map_lookup_elem(&dom_ctxs, &dom);
	u64 runnable, load;
	s32 queued;

	if (!ds || !dc || !ds->nr_cpus)
		return MLSCHED_LOAD_SCALE;
	queued = scx_bpf_dsq_nr_queued(DOM_DSQ(dom));
	if (queued < 0)
		queued = 0;
	*busy = dc->nr_idle >= ds->nr_cpus ? 0 : ds->nr_cpus - dc->nr_idle;
	runnable = *busy + queued;
	load = runnable * MLSCHED_LOAD_SCALE / (MLSCHED_LOAD_FULL_PER_CPU * ds->nr_cpus);
	if (load > MLSCHED_LOAD_SCALE)
		load = MLSCHED_LOAD_SCALE;
	/* Racy but only informational: user space shows the last value. */
	ds->load_q = load;
	ds->queued = queued;
	return load;
}

static __always_inline u32 clamp_field(u64 v)
{
	return v > MLSCHED_KEY_FIELD_MAX ? MLSCHED_KEY_FIELD_MAX : v;
}

static __always_inline u64 pack_key(struct mlsched_candidate *c)
{
	return ((u64)c->cpu << MLSCHED_KEY_CPU_SHIFT) |
	       ((u64)c->cpu_idle << MLSCHED_KEY_IDLE_SHIFT) |
	       ((u64)c->cpu_not_idle << MLSCHED_KEY_NOT_IDLE_SHIFT) |
	       ((u64)c->src_load_q << MLSCHED_KEY_SRC_SHIFT) |
	       ((u64)c->dst_load_q << MLSCHED_KEY_DST_SHIFT);
}

/* Push a candidate record; false when the ring buffer is full (counted). */
static __always_inline bool push(struct mlsched_candidate *c, u64 now)
{
	struct mlsched_candidate *rec;

	rec = bpf_ringbuf_reserve(&candidates, sizeof(*rec), 0);
	if (!rec) {
		cnt_inc(MLSCHED_CNT_RB_DROPS);
		return false;
	}
	*rec = *c;
	rec->ts_ns = now;
	bpf_ringbuf_submit(rec, 0);
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
		return c->src_load_q - c->dst_load_q >= MLSCHED_LOAD_SCALE / 4 &&
		       c->cpu_idle > 0;
	default:
		return false;
	}
}

static __always_inline bool is_loader(struct task_struct *p)
{
	return loader_tgid && p->tgid == loader_tgid;
}

/* Tasks that cannot run everywhere stay with the kernel's default CPU choice. */
static __always_inline bool is_restricted(struct task_struct *p)
{
	return p->nr_cpus_allowed < nr_cpus;
}

/* State of the search for the least loaded other domain (a bpf_loop callback). */
struct dst_search {
	u32 src;		/* the waking task's domain */
	u32 src_load;		/* its load, 0..LOAD_SCALE */
	u32 src_busy;		/* its busy CPUs */
	u32 best;		/* lowest load seen so far */
	u32 dst;		/* the domain with that load */
	bool found;
};

/*
 * bpf_loop callbacks are verified once, whatever the trip count: a plain loop
 * over 64 domains tracking the best one explodes the verifier's state space.
 */
static long find_dst_cb(u64 d, void *data)
{
	struct dst_search *s = data;
	u32 busy, load;

	if (d == s->src)
		return 0;
	load = dom_load_q(d, &busy);
	if (load < s->src_load && load < s->best) {
		s->best = load;
		s->dst = d;
		s->found = true;
	}
	return 0;
}

s32 BPF_STRUCT_OPS(mlsched_select_cpu, struct task_struct *p, s32 prev_cpu, u64 wake_flags)
{
	struct mlsched_candidate c = {};
	struct dst_search search = {};
	const struct cpumask *mask;
	u32 src, dst;
	u32 *decision;
	bool migrate;
	s32 cpu;

	cnt_inc(MLSCHED_CNT_SELECT);

	if (is_restricted(p) || is_loader(p)) {
		bool is_idle = false;

		cpu = scx_bpf_select_cpu_dfl(p, prev_cpu, wake_flags, &is_idle);
		if (is_idle)
			scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		return cpu;
	}

	src = dom_of(prev_cpu);
	mask = dom_cpus(src);
	if (!mask)
		return prev_cpu;
	/* An idle CPU where the task last ran, else in its domain: stay. */
	if (scx_bpf_test_and_clear_cpu_idle(prev_cpu))
		cpu = prev_cpu;
	else
		cpu = scx_bpf_pick_idle_cpu(mask, 0);
	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
		cnt_inc(MLSCHED_CNT_LOCAL);
		return cpu;
	}

	/* No idle CPU at home: is another domain less loaded? */
	search.src = src;
	search.src_load = dom_load_q(src, &search.src_busy);
	search.best = MLSCHED_LOAD_SCALE + 1;
	bpf_loop(nr_doms, find_dst_cb, &search, 0);
	if (!search.found) {
		cnt_inc(MLSCHED_CNT_NO_CANDIDATE);
		return prev_cpu;
	}
	dst = search.dst;

	cnt_inc(MLSCHED_CNT_CANDIDATES);
	c.pid = p->pid;
	c.cpu = prev_cpu;
	c.src_dom = src;
	c.dst_dom = dst;
	c.src_load_q = search.src_load;
	c.dst_load_q = search.best;
	c.cpu_not_idle = clamp_field(search.src_busy);
	{
		struct dom_ctx *dc = bpf_map_lookup_elem(&dom_ctxs, &dst);

		c.cpu_idle = dc ? clamp_field(dc->nr_idle) : 0;
	}
	c.key = pack_key(&c);

	if (collect) {
		if (explore && (bpf_get_prandom_u32() & 0xffff) < explore) {
			migrate = bpf_get_prandom_u32() & 1;
			c.source = MLSCHED_SRC_EXPLORE;
			cnt_inc(MLSCHED_CNT_EXPLORED);
		} else {
			migrate = fallback_migrate(&c);
			c.source = MLSCHED_SRC_FALLBACK;
		}
		cnt_inc(migrate ? MLSCHED_CNT_FALLBACK_MIGRATE : MLSCHED_CNT_FALLBACK_KEEP);
		c.action = migrate ? MLSCHED_MIGRATE : MLSCHED_KEEP;
		push(&c, bpf_ktime_get_ns());
		goto apply;
	}

	decision = bpf_map_lookup_elem(&decisions, &c.key);
	if (decision) {
		cnt_inc(MLSCHED_CNT_HITS);
		migrate = *decision == MLSCHED_MIGRATE;
		cnt_inc(migrate ? MLSCHED_CNT_MIGRATE : MLSCHED_CNT_KEEP);
	} else {
		cnt_inc(MLSCHED_CNT_MISSES);
		migrate = fallback_migrate(&c);
		cnt_inc(migrate ? MLSCHED_CNT_FALLBACK_MIGRATE : MLSCHED_CNT_FALLBACK_KEEP);
		c.action = migrate ? MLSCHED_MIGRATE : MLSCHED_KEEP;
		c.source = MLSCHED_SRC_FALLBACK;
		submit_once(&c);
	}
apply:
	if (!migrate)
		return prev_cpu;

	mask = dom_cpus(dst);
	if (!mask)
		return prev_cpu;
	cpu = scx_bpf_pick_idle_cpu(mask, 0);
	if (cpu >= 0) {
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL, slice_ns, 0);
	} else {
		/* No idle CPU there: queue on the destination domain all the same. */
		cpu = scx_bpf_pick_any_cpu(mask, 0);
		if (cpu < 0)
			return prev_cpu;
	}
	cnt_inc(MLSCHED_CNT_MIGRATIONS);
	return cpu;
}

static __always_inline void insert_vtime(struct task_struct *p, u64 dsq_id, u64 enq_flags)
{
	struct scx_bpf_dsq_insert_vtime_args args = {
		.dsq_id = dsq_id,
		.slice = slice_ns,
		.vtime = p->scx.dsq_vtime,
		.enq_flags = enq_flags,
	};

	/*
	 * A sleeper may bank at most one slice of credit, and a task of low
	 * weight may be queued at most VTIME_MAX_LAG_SLICES ahead: its wait
	 * stays far below the watchdog's timeout whatever its nice value.
	 */
	if ((s64)(args.vtime - (vtime_now - slice_ns)) < 0)
		args.vtime = vtime_now - slice_ns;
	else if ((s64)(args.vtime - (vtime_now + VTIME_MAX_LAG_SLICES * slice_ns)) > 0)
		args.vtime = vtime_now + VTIME_MAX_LAG_SLICES * slice_ns;
	__scx_bpf_dsq_insert_vtime(p, &args);
}

void BPF_STRUCT_OPS(mlsched_enqueue, struct task_struct *p, u64 enq_flags)
{
	s32 cpu = scx_bpf_task_cpu(p), idle;
	const struct cpumask *mask;
	u32 dom;

	if (is_loader(p) && (enq_flags & SCX_ENQ_WAKEUP)) {
		cnt_inc(MLSCHED_CNT_LOADER_WAKEUPS);
		scx_bpf_dsq_insert(p, SCX_DSQ_LOCAL_ON | cpu, slice_ns, enq_flags | SCX_ENQ_HEAD);
		scx_bpf_kick_cpu(cpu, SCX_KICK_PREEMPT);
		return;
	}
	if (is_restricted(p)) {
		/*
		 * Its own CPU is always allowed; a domain queue might not be.
		 * Not the local DSQ: a CPU whose local DSQ never empties (a
		 * pinned hog) would never serve its domain queue again.
		 */
		cnt_inc(MLSCHED_CNT_PINNED);
		insert_vtime(p, CPU_DSQ(cpu), enq_flags);
		scx_bpf_kick_cpu(cpu, SCX_KICK_IDLE);
		return;
	}

	dom = dom_of(cpu);
	insert_vtime(p, DOM_DSQ(dom), enq_flags);

	/* Wake an idle CPU of the domain, or any idle CPU: it will steal. */
	mask = dom_cpus(dom);
	idle = mask ? scx_bpf_pick_idle_cpu(mask, 0) : -1;
	if (idle < 0)
		idle = scx_bpf_pick_idle_cpu(p->cpus_ptr, 0);
	if (idle >= 0)
		scx_bpf_kick_cpu(idle, SCX_KICK_IDLE);
}

/* State of the search for the domain to steal from (a bpf_loop callback). */
struct victim_search {
	u32 home;
	u32 victim;
	s32 most;		/* deepest DSQ seen so far */
};

static long find_victim_cb(u64 d, void *data)
{
	struct victim_search *s = data;
	s32 queued;

	if (d == s->home)
		return 0;
	queued = scx_bpf_dsq_nr_queued(DOM_DSQ(d));
	if (queued > s->most) {
		s->most = queued;
		s->victim = d;
	}
	return 0;
}

void BPF_STRUCT_OPS(mlsched_dispatch, s32 cpu, struct task_struct *prev)
{
	struct victim_search search = { .home = dom_of(cpu) };
	u64 first = DOM_DSQ(search.home), second = CPU_DSQ(cpu);
	u32 zero = 0;
	struct cpu_ctx *cc = bpf_map_lookup_elem(&cpu_ctxs, &zero);

	/* Serve the CPU's own queue and its domain's in turn: neither starves. */
	if (cc && (cc->dispatches++ & 1)) {
		first = CPU_DSQ(cpu);
		second = DOM_DSQ(search.home);
	}
	if (scx_bpf_dsq_move_to_local(first) || scx_bpf_dsq_move_to_local(second))
		return;

	/* Home queue empty: steal from the busiest other domain. */
	bpf_loop(nr_doms, find_victim_cb, &search, 0);
	if (search.most > 0 && scx_bpf_dsq_move_to_local(DOM_DSQ(search.victim)))
		cnt_inc(MLSCHED_CNT_STEALS);
}

void BPF_STRUCT_OPS(mlsched_running, struct task_struct *p)
{
	/* The loader jumps the queue on wakeup: it must not drive the clock. */
	if (is_loader(p))
		return;
	/* Racy but contained: vtime_now only moves forward, roughly. */
	if ((s64)(vtime_now - p->scx.dsq_vtime) < 0)
		vtime_now = p->scx.dsq_vtime;
}

void BPF_STRUCT_OPS(mlsched_stopping, struct task_struct *p, bool runnable)
{
	/* Charge the slice used, scaled by the inverse of the task's weight. */
	p->scx.dsq_vtime += (slice_ns - p->scx.slice) * 100 / p->scx.weight;
}

void BPF_STRUCT_OPS(mlsched_enable, struct task_struct *p)
{
	p->scx.dsq_vtime = vtime_now;
}

void BPF_STRUCT_OPS(mlsched_update_idle, s32 cpu, bool idle)
{
	u32 zero = 0, dom = dom_of(cpu);
	struct dom_ctx *dc;
	struct cpu_ctx *cc;

	/* Each CPU reports only itself, so its own flag has a single writer. */
	cc = bpf_map_lookup_elem(&cpu_ctxs, &zero);
	dc = bpf_map_lookup_elem(&dom_ctxs, &dom);
	if (!cc || !dc || cc->idle == idle)
		return;
	cc->idle = idle;
	if (idle)
		__sync_fetch_and_add(&dc->nr_idle, 1);
	else
		__sync_fetch_and_sub(&dc->nr_idle, 1);
}

/* Add one CPU to its domain's cpumask; returns 1 (stop) on failure. */
static long add_cpu_cb(u64 cpu, void *data)
{
	struct bpf_cpumask *mask, *old;
	struct mlsched_dom_stat *ds;
	struct dom_ctx *dc;
	u32 d = dom_of(cpu);

	if (scx_bpf_create_dsq(CPU_DSQ(cpu), -1))
		return 1;
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
	ds->nr_cpus++;
	return 0;
}

s32 BPF_STRUCT_OPS_SLEEPABLE(mlsched_init)
{
	u32 d;
	s32 ret;

	nr_cpus = cfg_get(MLSCHED_CFG_NR_CPUS);
	nr_doms = cfg_get(MLSCHED_CFG_NR_DOMS);
	fallback_policy = cfg_get(MLSCHED_CFG_FALLBACK);
	if (cfg_get(MLSCHED_CFG_SLICE_NS))
		slice_ns = cfg_get(MLSCHED_CFG_SLICE_NS);
	if (cfg_get(MLSCHED_CFG_RESUBMIT_NS))
		resubmit_ns = cfg_get(MLSCHED_CFG_RESUBMIT_NS);
	collect = cfg_get(MLSCHED_CFG_COLLECT);
	loader_tgid = cfg_get(MLSCHED_CFG_LOADER_TGID);
	explore = cfg_get(MLSCHED_CFG_EXPLORE);
	if (!nr_cpus || nr_cpus > MLSCHED_MAX_CPUS || !nr_doms || nr_doms > MLSCHED_MAX_DOMS) {
		mlsched_error("bad config: %u cpus, %u domains", nr_cpus, nr_doms);
		return -EINVAL;
	}

	for (d = 0; d < MLSCHED_MAX_DOMS; d++) {
		if (d >= nr_doms)
			break;
		ret = scx_bpf_create_dsq(DOM_DSQ(d), -1);
		if (ret) {
			mlsched_error("failed to create DSQ for domain %u (%d)", d, ret);
			return ret;
		}
	}

	/* Build each domain's cpumask one CPU at a time. */
	ret = bpf_loop(nr_cpus, add_cpu_cb, NULL, 0);
	if (ret < 0 || ret != nr_cpus) {
		mlsched_error("failed to build the domain cpumasks (%d)", ret);
		return ret < 0 ? ret : -ENOMEM;
	}
	return 0;
}

void BPF_STRUCT_OPS(mlsched_exit, struct scx_exit_info *ei)
{
	u32 zero = 0;
	struct mlsched_exit_info *info = bpf_map_lookup_elem(&exit_info, &zero);

	if (!info)
		return;
	bpf_probe_read_kernel_str(info->reason, sizeof(info->reason), ei->reason);
	bpf_probe_read_kernel_str(info->msg, sizeof(info->msg), ei->msg);
	info->exit_code = ei->exit_code;
	/* Written last: user space treats kind != 0 as "the scheduler left". */
	info->kind = ei->kind;
}

SEC(".struct_ops.link")
struct sched_ext_ops mlsched_ops = {
	.select_cpu	= (void *)mlsched_select_cpu,
	.enqueue	= (void *)mlsched_enqueue,
	.dispatch	= (void *)mlsched_dispatch,
	.running	= (void *)mlsched_running,
	.stopping	= (void *)mlsched_stopping,
	.enable		= (void *)mlsched_enable,
	.update_idle	= (void *)mlsched_update_idle,
	.init		= (void *)mlsched_init,
	.exit		= (void *)mlsched_exit,
	/* update_idle is ours, but pick_idle_cpu still needs the kernel's tracking. */
	.flags		= SCX_OPS_KEEP_BUILTIN_IDLE,
	.timeout_ms	= WATCHDOG_TIMEOUT_MS,
	.name		= "mlsched",
};
