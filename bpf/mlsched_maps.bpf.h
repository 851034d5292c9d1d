/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The two maps of the decision loop, one definition for the scheduler and
 * tools/bench's ring buffer producer: candidates go up, decisions come down.
 */
#ifndef __MLSCHED_MAPS_BPF_H
#define __MLSCHED_MAPS_BPF_H

/* Ring buffer of struct mlsched_candidate; size set by the loader. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, MLSCHED_RINGBUF_DEFAULT_BYTES);
} candidates SEC(".maps");

/*
 * Decision key -> (generation << 8) | enum mlsched_decision, written in
 * batches by user space: the table of machines whose grid is too large.
 */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, u64);
	__type(value, u32);
} decisions SEC(".maps");

#endif /* __MLSCHED_MAPS_BPF_H */
