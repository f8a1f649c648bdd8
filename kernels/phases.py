"""Triton helpers of a phase barrier inside one launch: producer programs, then consumers that wait for them.

A launch of P producers and C consumers has a 1-D grid of P + C programs::

    programs [0, P)       producers: do their phase, publish it (:func:`phase_publish`: FLAG += 1, release)
    programs [P, P + C)   consumers: do their independent work, wait until FLAG == P (:func:`phase_wait`, acquire),
                          then read what the producers wrote (loads with cache_modifier=".cg")
    every program         ends with :func:`phase_end` (DONE += 1); the last one resets FLAG and DONE to 0

Why producers take the lowest program ids: the hardware dispatches the blocks of a 1-D grid in increasing id order,
so every producer is resident (or finished) before any consumer is dispatched, and a producer never waits on
anything. A spinning consumer therefore can only hold an SM that no producer still needs: the launch cannot
deadlock whatever the grid size. (A 2-D grid would interleave producers and consumers in dispatch order; the
launchers use 1-D grids for this reason.)

Why the counters reset themselves: FLAG and DONE live in a small buffer that is zero when a launch starts, so no
zero-fill launch is needed per call and a CUDA-graph replay finds them zero. The last program to finish (the one
that sees DONE == grid size - 1) knows that no other program of the launch still reads FLAG.

Why the loads of produced data bypass L1 (".cg"): L1 is not coherent between SMs; the acquire makes the
producers' writes visible at L2, and a consumer must not read a stale L1 line of the same address.

Under the Triton interpreter the programs run one at a time in grid order, so a consumer always finds FLAG == P
at its first look; with ``INTERPRET`` it checks that once and raises instead of spinning (a wrong grid layout
fails loudly rather than hangs).
"""
import triton
import triton.language as tl


@triton.jit
def phase_publish(FLAG):
    """A producer's last step: its stores are done (barrier), then FLAG += 1 with release semantics at gpu scope."""
    # every thread of the program has issued its stores before the one releasing atomic
    tl.debug_barrier()
    tl.atomic_add(FLAG, 1, sem="release", scope="gpu")


@triton.jit
def phase_wait(FLAG, producers, INTERPRET: tl.constexpr):
    """A consumer's wait until all ``producers`` have published (acquire at gpu scope)."""
    seen = tl.atomic_add(FLAG, 0, sem="acquire", scope="gpu")
    if INTERPRET:
        # one program at a time in grid order: the producers (lower ids) have all run, or the layout is wrong
        assert seen == producers, "phase barrier: a consumer ran before its producers (grid layout)"
    else:
        while seen < producers:
            seen = tl.atomic_add(FLAG, 0, sem="acquire", scope="gpu")
    # the whole program reads the produced data only after the acquire
    tl.debug_barrier()


@triton.jit
def phase_end(FLAG, DONE):
    """Every program's very last step: DONE += 1; the last program of the launch resets FLAG and DONE to 0."""
    done = tl.atomic_add(DONE, 1, sem="acq_rel", scope="gpu")
    if done == tl.num_programs(0) - 1:
        tl.atomic_xchg(FLAG, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(DONE, 0, sem="relaxed", scope="gpu")
