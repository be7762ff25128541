"""Step planning: which examples form each micro-batch and optimizer step, as compact numpy arrays.

A plan is a list of optimizer steps. Each step holds `world * k` micro-batches (micro-batch j of a step goes
to rank j % world, accumulation slot j // world); empty micro-batches keep the ranks in lockstep. A
micro-batch is a token budget: with packing its examples are flattened into one (1, T) sequence with
T <= budget; without packing they are padded rows with rows x longest <= budget.

- Token steps (default): k = grad_accum; micro-batches are filled first-fit in shuffled order.
- Example steps (`global_batch_examples` N): each step holds exactly N examples of the shuffled order (the
  last step of an epoch may hold fewer), spread over world x k micro-batches balanced by tokens, with the
  smallest k that fits the budget.

The plan is a pure function of (keys, lengths, settings, seed): keys are sorted before the seeded
shuffle, so a resumed run replays exactly the same samples from the saved step on, whatever the read order.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

GROUP_WINDOW = 64  # budgets of examples per length-sorting window when packing is off
OPEN_BINS = 8  # micro-batches kept open for first-fit packing


@dataclass
class Plan:
    """keys[micro_starts[m]:micro_starts[m+1]] is micro-batch m; micro-batches step_starts[s]..step_starts[s+1]-1
    form step s (a multiple of `world`)."""

    keys: np.ndarray  # int64 example keys in plan order
    micro_starts: np.ndarray  # int64, n_micro + 1
    step_starts: np.ndarray  # int64, n_steps + 1
    world: int

    def __len__(self) -> int:
        return len(self.step_starts) - 1

    def micro(self, m: int) -> np.ndarray:
        return self.keys[self.micro_starts[m]:self.micro_starts[m + 1]]

    def rank_micros(self, step: int, rank: int) -> list[np.ndarray]:
        """The micro-batches (example keys) that `rank` runs in `step`, in accumulation order."""
        return [self.micro(m) for m in range(self.step_starts[step] + rank, self.step_starts[step + 1], self.world)]

    def step_keys(self, step: int) -> np.ndarray:
        return self.keys[self.micro_starts[self.step_starts[step]]:self.micro_starts[self.step_starts[step + 1]]]

    def rank_keys(self, rank: int, start_step: int = 0) -> np.ndarray:
        """Sorted unique keys that `rank` trains from `start_step` on (what its worker must read)."""
        step_of_micro = np.repeat(np.arange(len(self)), np.diff(self.step_starts))
        slot = np.arange(len(step_of_micro)) - self.step_starts[step_of_micro]
        mine = (slot % self.world == rank) & (step_of_micro >= start_step)
        return np.unique(self.keys[np.repeat(mine, np.diff(self.micro_starts))])

    def truncated(self, max_steps: int | None) -> "Plan":
        if not max_steps or max_steps >= len(self):
            return self
        step_starts = self.step_starts[:max_steps + 1]
        micro_starts = self.micro_starts[:step_starts[-1] + 1]
        return Plan(self.keys[:micro_starts[-1]], micro_starts, step_starts, self.world)

    def digest_payload(self) -> bytes:
        return b"".join(a.astype(np.int64).tobytes() for a in (self.keys, self.micro_starts, self.step_starts))


def _first_fit(order: list[int], length: dict[int, int], budget: int) -> list[list[int]]:
    """Packed micro-batches: first-fit over a few open bins, in shuffled order (random, little waste)."""
    bins: list[list[int]] = []
    open_bins: list[tuple[int, list[int]]] = []
    for key in order:
        n = length[key]
        for i, (used, keys) in enumerate(open_bins):
            if used + n <= budget:
                keys.append(key)
                open_bins[i] = (used + n, keys)
                break
        else:
            if len(open_bins) == OPEN_BINS:
                bins.append(open_bins.pop(0)[1])
            open_bins.append((n, [key]))
    bins.extend(keys for _, keys in open_bins)
    return bins


def _padded_groups(order: list[int], length: dict[int, int], budget: int) -> list[list[int]]:
    """Padded micro-batches: examples sorted by length inside windows, rows x longest <= budget."""
    mean = sum(length[k] for k in order) / max(1, len(order))
    window = GROUP_WINDOW * max(1, int(budget // max(1.0, mean)))
    groups: list[list[int]] = []
    for start in range(0, len(order), window):
        current: list[int] = []
        for key in sorted(order[start:start + window], key=lambda k: (length[k], k)):
            if current and (len(current) + 1) * length[key] > budget:
                groups.append(current)
                current = []
            current.append(key)
        if current:
            groups.append(current)
    return groups


def _balanced_bins(keys: np.ndarray, lens: np.ndarray, budget: int, world: int) -> list[list[int]]:
    """Packed example step: the fewest world x k bins (all <= budget) that hold the chunk, balanced by tokens
    (longest first into the least-filled bin)."""
    order = np.lexsort((keys, -lens))
    ordered = list(zip(keys[order].tolist(), lens[order].tolist()))
    k = max(1, math.ceil(int(lens.sum()) / (world * budget)))
    while True:
        heap = [(0, b) for b in range(world * k)]
        bins: list[list[int]] = [[] for _ in range(world * k)]
        for key, n in ordered:
            used, b = heap[0]
            if used + n > budget:
                break
            bins[b].append(key)
            heapq.heapreplace(heap, (used + n, b))
        else:
            return bins
        k += 1


def _dealt(groups: list[list[int]], length: dict[int, int], world: int) -> list[list[int]]:
    """Padded example step: groups dealt to ranks (heaviest first, to the least-loaded rank), k groups per rank."""
    k = max(1, math.ceil(len(groups) / world))
    cost = {id(g): len(g) * max(length[x] for x in g) for g in groups}
    per_rank: list[list[list[int]]] = [[] for _ in range(world)]
    load = [0] * world
    for g in sorted(groups, key=lambda g: (-cost[id(g)], g[0])):
        r = min((r for r in range(world) if len(per_rank[r]) < k), key=lambda r: (load[r], r))
        per_rank[r].append(g)
        load[r] += cost[id(g)]
    return [per_rank[r][slot] if slot < len(per_rank[r]) else [] for slot in range(k) for r in range(world)]


def _epoch_steps(keys: np.ndarray, lens: np.ndarray, length: dict[int, int], rng, *, packing: bool, budget: int,
                 world: int, grad_accum: int, global_batch_examples: int | None) -> list[list[list[int]]]:
    """One epoch's steps from the examples in shuffled order (keys and their lengths)."""
    if global_batch_examples:
        steps = []
        for start in range(0, len(keys), global_batch_examples):
            chunk = slice(start, start + global_batch_examples)
            if packing:
                steps.append(_balanced_bins(keys[chunk], lens[chunk], budget, world))
            else:
                steps.append(_dealt(_padded_groups(keys[chunk].tolist(), length, budget), length, world))
        return steps
    order = keys.tolist()
    micros = _first_fit(order, length, budget) if packing else _padded_groups(order, length, budget)
    if not packing:  # groups come out length-sorted per window; spread short and long ones over the epoch
        micros = [micros[i] for i in rng.permutation(len(micros))]
    slots = world * grad_accum
    steps = [micros[i:i + slots] for i in range(0, len(micros), slots)]
    if steps and len(steps[-1]) < slots:  # empty micro-batches keep ranks in lockstep; nothing dropped
        steps[-1] = steps[-1] + [[] for _ in range(slots - len(steps[-1]))]
    return steps


def plan_stage(keys: np.ndarray, lengths: np.ndarray, *, epochs: int, max_steps: int | None, packing: bool,
               budget: int, world: int, grad_accum: int = 1, global_batch_examples: int | None = None,
               seed: int = 0) -> Plan:
    """All steps of a stage (epochs in order, each reshuffled with (seed, epoch)), capped at max_steps."""
    keys = np.asarray(keys, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(keys) and lengths.max() > budget:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the micro-batch budget of {budget}")
    length = {} if packing and global_batch_examples else dict(zip(keys.tolist(), lengths.tolist()))
    by_key = np.argsort(keys, kind="stable")  # positions of the keys in sorted order
    flat: list[int] = []
    micro_sizes: list[int] = []
    step_sizes: list[int] = []
    for epoch in range(epochs):
        rng = np.random.default_rng([seed, epoch])
        order = by_key.copy()
        rng.shuffle(order)  # the same permutation of the sorted keys whatever the input order
        for step in _epoch_steps(keys[order], lengths[order], length, rng, packing=packing, budget=budget, world=world,
                                 grad_accum=grad_accum, global_batch_examples=global_batch_examples):
            step_sizes.append(len(step))
            for micro in step:
                micro_sizes.append(len(micro))
                flat.extend(micro)
        if max_steps and len(step_sizes) >= max_steps:
            break
    plan = Plan(np.array(flat, dtype=np.int64), np.concatenate([[0], np.cumsum(micro_sizes)]).astype(np.int64),
                np.concatenate([[0], np.cumsum(step_sizes)]).astype(np.int64), world)
    return plan.truncated(max_steps)


@dataclass
class StepStats:
    """Per-step totals computed on the host from the plan (no device sync needed in the loop)."""

    examples: np.ndarray
    tokens: np.ndarray  # non-pad tokens
    targets: np.ndarray  # supervised positions (the loss denominator)
    computed: np.ndarray  # positions the model computes: tokens with packing, rows x longest padded
    flops: np.ndarray  # our convention (metrics.training_flops)
    flops_anchor: np.ndarray  # metrics.ANCHOR_CONVENTION


def step_stats(plan: Plan, keys: np.ndarray, lengths: np.ndarray, n_target: np.ndarray, shape, packing: bool) -> StepStats:
    """Vectorised per-step sums over the plan; `shape` is metrics.ModelShape."""
    from metaaligner.training.metrics import anchor_flops, training_flops

    order = np.argsort(keys)
    idx = order[np.searchsorted(keys, plan.keys, sorter=order)]
    lens, tgts = lengths[idx].astype(np.float64), n_target[idx].astype(np.float64)
    per_example = training_flops(shape, lens, tgts)
    step_of_key = np.repeat(np.arange(len(plan)), np.diff(plan.micro_starts[plan.step_starts]))
    n = len(plan)

    def per_step(values: np.ndarray) -> np.ndarray:
        return np.bincount(step_of_key, weights=values, minlength=n)

    micro_of_key = np.repeat(np.arange(len(plan.micro_starts) - 1), np.diff(plan.micro_starts))
    if packing:
        computed = per_step(lens)
        padded = None  # each example is its own sequence
    else:
        n_micro = len(plan.micro_starts) - 1
        longest = np.zeros(n_micro)
        np.maximum.at(longest, micro_of_key, lens)
        rows = np.diff(plan.micro_starts).astype(np.float64)
        step_of_micro = np.repeat(np.arange(n), np.diff(plan.step_starts))
        computed = np.bincount(step_of_micro, weights=rows * longest, minlength=n)
        padded = longest[micro_of_key]  # every row is padded to its micro-batch's longest
    return StepStats(examples=per_step(np.ones_like(lens)).astype(np.int64), tokens=per_step(lens).astype(np.int64),
                     targets=per_step(tgts).astype(np.int64), computed=computed.astype(np.int64),
                     flops=per_step(per_example), flops_anchor=per_step(anchor_flops(shape, lens, padded)))
