/*
 * bench.h: the benchmark jobs (bench.c), which time the disk from inside the guest.
 */
#ifndef BENCH_H
#define BENCH_H

#include "blk.h"

enum bench_kind {
    BENCH_SEQREAD,                      /* 64 KiB reads, in disk order, wrapping at the end */
    BENCH_SEQWRITE,                     /* 64 KiB writes, in disk order, wrapping at the end */
    BENCH_RANDREAD,                     /* 4 KiB reads at random 4 KiB-aligned offsets */
};

#define BENCH_DEFAULT_DEPTH 8
#define BENCH_DEFAULT_SECONDS 3
#define BENCH_MAX_SECONDS 3600

/* Parses a bench kind ("seqread", "seqwrite", "randread"); false if it is none of them. */
bool bench_kind_from_name(const char *name, enum bench_kind *kind);

/* Runs the job on an initialized device (blk_init with `depth`) for about `seconds`
 * seconds with up to `depth` requests in flight, and prints its result line. */
void bench_run(struct blk *blk, enum bench_kind kind, uint32_t depth, uint32_t seconds);

#endif
