"""Sparse arch: one TorchRec ``EmbeddingCollection`` over all sequence features, mean-pooled per position.

The collection is built on whatever device it is given; the trainer builds it on ``meta`` and lets
``DistributedModelParallel`` materialise the shards, so nothing here knows about process groups.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from data.config import FeatureConfig

logger = logging.getLogger(__name__)

# RecIS's TruncNormalInitializer(std=0.001), truncated at two standard deviations like TF's.
EMBEDDING_INIT_STD = 0.001


def trunc_normal_init_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Seed init of an embedding table (or of one shard of it): N(0, std²) redrawn outside ±2 std.

    Rejection sampling instead of ``nn.init.trunc_normal_``: the latter's inverse-CDF path (erfinv) took
    about two minutes for the seed's two 2,048,000 x 128 tables on a CPU; redrawing the ~4.6% of values
    outside the bounds costs a few ``randn`` calls.
    """
    with torch.no_grad():
        flat = weight.view(-1)
        values = torch.randn(flat.shape, generator=generator, dtype=torch.float32)
        # One pass over the table to find the misses, then only the shrinking set of misses is redrawn.
        redo = torch.nonzero(values.abs() > 2.0).squeeze(1)
        while redo.numel():
            draw = torch.randn(redo.numel(), generator=generator, dtype=torch.float32)
            values[redo] = draw
            redo = redo[draw.abs() > 2.0]
        flat.copy_(values.mul_(EMBEDDING_INIT_STD))
    return weight


def embedding_configs(features: list[FeatureConfig]) -> list[EmbeddingConfig]:
    """One table per ``FeatureConfig.table`` (the seed's ``shard_name``); features that share it share its rows."""
    tables: dict[str, EmbeddingConfig] = {}
    for f in features:
        table = tables.get(f.table)
        if table is None:
            tables[f.table] = EmbeddingConfig(
                name=f.table,
                embedding_dim=f.emb_dim,
                num_embeddings=f.table_rows,
                feature_names=[f.name],
                # Used when the table is materialised unsharded; sharded (fbgemm) tables are re-initialised
                # by the trainer, since fbgemm only knows uniform init.
                init_fn=trunc_normal_init_,
                weight_init_min=-2 * EMBEDDING_INIT_STD,
                weight_init_max=2 * EMBEDDING_INIT_STD,
            )
        else:
            table.feature_names.append(f.name)
    return list(tables.values())


class PositionMeanPooling(nn.Module):
    """Averages the values of each position (bag) and concatenates features: ``{name: JT}`` -> ``[B*T, E]``.

    Kept as its own module so TorchRec's pipeline tracer treats it as a leaf and never traces its
    data-dependent shapes.
    """

    def __init__(self, feature_names: list[str], managed_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.feature_names = feature_names
        # Features whose embeddings come from the managed-collision collection (the second argument).
        self.managed_names = frozenset(managed_names)

    def forward(
        self, embeddings: dict[str, JaggedTensor] | None, managed: dict[str, JaggedTensor] | None = None
    ) -> torch.Tensor:
        # Plain indexing only: under DMP the arguments may be TorchRec lazy awaitables of dicts.
        pooled = [
            self._mean((managed if name in self.managed_names else embeddings)[name])  # type: ignore[index]
            for name in self.feature_names
        ]
        return torch.cat(pooled, dim=-1)

    @staticmethod
    def _mean(jt: JaggedTensor) -> torch.Tensor:
        values, lengths = jt.values(), jt.lengths()
        num_bags = lengths.numel()
        # Bag index of every looked-up row; output_size avoids a device->host sync on CUDA.
        bag = torch.repeat_interleave(
            torch.arange(num_bags, device=values.device), lengths.long(), output_size=values.shape[0]
        )
        summed = values.new_zeros(num_bags, values.shape[-1]).index_add_(0, bag, values)
        # Empty bags (padding, empty positions) stay zero instead of dividing by zero.
        return summed / lengths.clamp(min=1).unsqueeze(-1).to(values.dtype)


class SparseArch(nn.Module):
    """KJT (one bag per position, stride ``B*T``) -> ``[B*T, emb_size]`` concatenated mean embeddings.

    Tables of fixed size live in ``embedding_collection``; tables of unbounded hashed ids (bucket 0) in
    ``mc_embedding_collection``, a managed-collision collection (TorchRec requires a managed-collision
    module for every table of one). Both read the same KJT and pick their own keys, so each stays a
    module fed straight from the batch, which TorchRec's pipeline needs to pipeline its input dist.
    """

    def __init__(self, features: list[FeatureConfig], device: torch.device | None = None) -> None:
        super().__init__()
        plain = [f for f in features if not f.managed_collision]
        managed = [f for f in features if f.managed_collision]
        self.embedding_collection = (
            EmbeddingCollection(tables=embedding_configs(plain), device=device) if plain else None
        )
        self.mc_embedding_collection = managed_collision_collection(managed, device) if managed else None
        self.pooling = PositionMeanPooling([f.name for f in features], tuple(f.name for f in managed))

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        plain: dict[str, JaggedTensor] | None = None
        managed: dict[str, JaggedTensor] | None = None
        if self.embedding_collection is not None:
            plain = self.embedding_collection(features)
        if self.mc_embedding_collection is not None:
            # (embeddings, remapped ids or None): index rather than unpack, which fx tracing cannot do.
            managed = self.mc_embedding_collection(features)[0]
        return self.pooling(plain, managed)


# ---------------------------------------------------------------------------------------------------------
# Managed collisions: unbounded 63-bit ids -> a fixed number of rows, without collisions until it is full


_EVICTION_POLICIES: dict[str, type[MCHEvictionPolicy]] = {
    "distance_lfu": DistanceLFU_EvictionPolicy,
    "lfu": LFU_EvictionPolicy,
    "lru": LRU_EvictionPolicy,
}


class CountingMCHModule(MCHManagedCollisionModule):
    """``MCHManagedCollisionModule`` that counts the ids it admits and evicts, and logs them.

    TorchRec rebuilds the module per shard with ``type(self)(...)``, so every rank's shard counts its own
    rows. ``evict()`` returns the slots (re)filled at an admission round: new ids that took a free slot
    plus ids that took an evicted id's slot; the drop in free slots tells the two apart.

    Checkpoints: the id -> slot mapping and the eviction policy's per-slot metadata are buffers in the
    sharded state dict (DCP saves them with the tables). What is not, and makes a resume differ from a
    straight run, is kept by ``checkpoint_state`` / ``load_checkpoint_state``: the ids seen since the last
    admission round (with ``mc_eviction_interval > 1`` they are admitted at the next round), when that round
    was, the history buffer's size (it caps how many ids one interval records) and the counters here.
    """

    # Log a line every this many admission rounds that evicted something (and on the first one).
    LOG_EVERY_ROUNDS = 100

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.admitted_total = 0
        self.evicted_total = 0
        self._rounds_with_evictions = 0
        self._free_slots = self._zch_size

    @torch.no_grad()
    def evict(self) -> torch.Tensor | None:
        slots = super().evict()
        if slots is None or self.device.type == "meta":
            return slots
        free_now = int(self.open_slots().item())
        admitted = int(slots.numel())
        evicted = max(0, admitted - (self._free_slots - free_now))
        self._free_slots = free_now
        self.admitted_total += admitted
        self.evicted_total += evicted
        if evicted:
            if self._rounds_with_evictions % self.LOG_EVERY_ROUNDS == 0:
                logger.info(
                    "managed collisions %s (%d rows here): %d ids admitted, %d evicted this round; %d admitted, "
                    "%d evicted so far",
                    self._name, self._zch_size, admitted, evicted, self.admitted_total, self.evicted_total,
                )  # fmt: skip
            self._rounds_with_evictions += 1
        return slots

    def checkpoint_state(self) -> dict[str, Any]:
        """This shard's state that its ``state_dict`` lacks (plain values and CPU tensors, for ``torch.save``)."""
        used = self._current_history_buffer_offset
        return {
            "last_eviction_iter": self._last_eviction_iter,
            "history_buffer_size": self._input_history_buffer_size,
            "history": self._history_accumulator[:used].cpu().clone() if used else torch.empty(0, dtype=torch.long),
            "history_metadata": {k: v[:used].cpu().clone() for k, v in self._history_metadata.items()},
            "admitted_total": self.admitted_total,
            "evicted_total": self.evicted_total,
            "rounds_with_evictions": self._rounds_with_evictions,
        }

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, Any] | None) -> None:
        """Continue where ``checkpoint_state`` left off; call after the state dict (buffers) is loaded.

        ``None`` (no saved state: another world size, or a checkpoint older than this state) keeps the mapping
        from the state dict, starts the counters at zero and the eviction schedule at the loaded iteration.
        """
        self._free_slots = int(self.open_slots().item())  # from the loaded mapping, whatever the source
        if state is None:
            return
        self.admitted_total = int(state["admitted_total"])
        self.evicted_total = int(state["evicted_total"])
        self._rounds_with_evictions = int(state["rounds_with_evictions"])
        if state["last_eviction_iter"] < 0:
            return  # saved before this shard's first training step: TorchRec's own start-up applies
        # Without this TorchRec's first profile() would take the loaded iteration as the last round's, moving
        # every later admission round when the checkpoint fell between two of them.
        self._current_iter = int(self._current_iter_tensor.item())
        self._last_eviction_iter = int(state["last_eviction_iter"])
        self._allocate_history(int(state["history_buffer_size"]))
        history: torch.Tensor = state["history"]
        used = history.numel()
        self._history_accumulator[:used] = history.to(self.device)
        for name, values in state["history_metadata"].items():
            self._history_metadata[name][:used] = values.to(self.device)
        self._current_history_buffer_offset = used

    def _allocate_history(self, size: int) -> None:
        """TorchRec's ``_init_history_buffers`` with the saved size instead of one derived from the first batch
        (a resumed run's first batch is another one, and the size decides which ids a full buffer drops)."""
        self._input_history_buffer_size = size
        self._history_accumulator = torch.empty(size, dtype=torch.int64, device=self.device)
        for name, _, is_history in self._eviction_policy.metadata_info:
            if is_history:
                self.register_buffer(
                    "_history_" + name, torch.zeros(size, dtype=torch.int64, device=self.device), persistent=False
                )
                self._history_metadata[name] = getattr(self, "_history_" + name)


def managed_collision_collection(
    features: list[FeatureConfig], device: torch.device | None = None
) -> ManagedCollisionEmbeddingCollection:
    """An MC-EC over bucket-0 features: each table gets an MCH module of ``mc_capacity`` rows."""
    device = device or torch.device("cpu")
    tables = embedding_configs(features)
    settings = {f.table: f for f in features}
    modules: dict[str, MCHManagedCollisionModule] = {}
    for table in tables:
        f = settings[table.name]
        modules[table.name] = CountingMCHModule(
            zch_size=f.mc_capacity,
            device=device,
            eviction_policy=_EVICTION_POLICIES[f.mc_eviction_policy](),
            eviction_interval=f.mc_eviction_interval,
            name=table.name,
        )
    return ManagedCollisionEmbeddingCollection(
        EmbeddingCollection(tables=tables, device=device),
        ManagedCollisionCollection(modules, tables),
        return_remapped_features=False,
    )


def set_mc_buckets(module: nn.Module, buckets: int) -> None:
    """Row-wise sharding routes raw ids to ranks in ``buckets`` equal ranges of the id space; TorchRec needs
    at least one bucket per rank. The world size is only known at sharding time, after the model is built
    (and MCH has no setter), hence the attribute."""
    for m in module.modules():
        if isinstance(m, MCHManagedCollisionModule):
            m._buckets = buckets


def managed_collision_stats(module: nn.Module) -> dict[str, tuple[int, int]]:
    """``{table: (admitted, evicted)}`` over this rank's managed-collision shards."""
    stats: dict[str, tuple[int, int]] = {}
    for m in module.modules():
        if isinstance(m, CountingMCHModule) and m.device.type != "meta":
            admitted, evicted = stats.get(m._name or "", (0, 0))
            stats[m._name or ""] = (admitted + m.admitted_total, evicted + m.evicted_total)
    return stats


def _counting_modules(module: nn.Module) -> dict[str, CountingMCHModule]:
    """This rank's managed-collision shards by module path (the same paths on every rank and world size)."""
    return {
        name: m for name, m in module.named_modules() if isinstance(m, CountingMCHModule) and m.device.type != "meta"
    }


def managed_collision_state(module: nn.Module) -> dict[str, dict[str, Any]]:
    """``{module path: CountingMCHModule.checkpoint_state()}`` of this rank's shards (for ``rank_<r>.pt``)."""
    return {name: m.checkpoint_state() for name, m in _counting_modules(module).items()}


def load_managed_collision_state(module: nn.Module, state: dict[str, dict[str, Any]] | None) -> None:
    """Inverse of ``managed_collision_state`` (``None``: see ``CountingMCHModule.load_checkpoint_state``)."""
    modules = _counting_modules(module)
    if state is not None and set(state) != set(modules):
        raise ValueError(f"managed-collision state for {sorted(state)}, but this model has {sorted(modules)}")
    for name, m in modules.items():
        m.load_checkpoint_state(None if state is None else state[name])
