"""Row bookkeeping shared by the loops and the models: chunks of rows, seeded epoch orders, position ids."""
from __future__ import annotations

from typing import Sequence, TypeVar

import torch

T = TypeVar("T", bound=Sequence)


def chunks(rows: T, size: int) -> list[T]:
    """Consecutive slices of at most `size` rows (a list or a tensor's first dim); the last may be short."""
    return [rows[i:i + size] for i in range(0, len(rows), size)]


class EpochSampler:
    """Global batches of row indices: one seeded permutation per epoch, ragged tail dropped.

    Stateless in the step number (batch(k) is always the same), so every rank draws the same
    global batch and a resumed run continues the same order.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int):
        self.num_rows, self.batch_size, self.seed = num_rows, batch_size, seed
        self.steps_per_epoch = num_rows // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> list[int]:
        """Row indices of step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_rows, generator=gen)
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size].tolist()


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, L] positions that skip left padding, as `generate()` uses them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
