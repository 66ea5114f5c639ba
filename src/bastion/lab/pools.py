"""The attacker's query pools: unlabelled inputs from the task's distribution.

An extraction attacker needs inputs to send, not labels (the server provides those).
The pools here come from the scenarios' own data generators, never from the server's
repository files:

* ``image``: the digits rows that are *not* in the scenario's held-out split, found by
  re-running the scenario's own split (``bastion.scenarios.image._load_data``) with the
  build's seed. Labels are dropped. This is the strong-attacker assumption of the
  extraction literature (unlabelled data from the training distribution); these rows
  are in fact the variants' training images, so agreement on them is an optimistic
  figure, which is why accuracy and fidelity are measured on the held-out rows only.
* ``malware``: new apps from the scenario's generator (``malware.generate``). The
  generator draws its "world" (common features, categories, malware families) first
  from the seed and the apps after; a *different* seed would draw a different world,
  i.e. another distribution that the victim never saw. So the pool is drawn with the
  build's seed and takes only rows past the first ``offset`` (the small build's train +
  eval count): the same world, apps that are not the build's (the generator's draws are
  vectorised over the row count, so these rows are fresh, not copies).
* any other zoo: an ``.npz`` file the attacker brings (:func:`load_pool`).

Rows are shuffled once with the lab seed (:meth:`Pool.ordered`), so explicit, naive and
fingerprinted attackers query the same rows in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["POOLS", "Pool", "image_pool", "load_pool", "malware_pool", "pool_for"]

POOLS = ("image", "malware")
_MALWARE_OFFSET = 6_000  # malware's small build: 4,000 train + 2,000 eval rows
_MALWARE_ROWS = 4_000


@dataclass(frozen=True)
class Pool:
    name: str
    x: np.ndarray
    description: str
    seed: int

    def ordered(self, seed: int) -> np.ndarray:
        """The rows in the attack's fixed order (one permutation per lab seed)."""
        return self.x[np.random.default_rng(seed).permutation(len(self.x))]

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "rows": len(self.x), "shape": list(self.x.shape[1:]),
                "seed": self.seed, "source": self.description}


def image_pool(seed: int = 0) -> Pool:
    """Digits rows outside the image scenario's eval split for build seed ``seed``."""
    from bastion.scenarios.image import _load_data

    x_train, _x_eval, _y_train, _y_eval = _load_data(seed)
    return Pool("image", np.ascontiguousarray(x_train, dtype=np.float32),
                f"sklearn digits outside the image scenario's held-out split (build seed {seed}), unlabelled", seed)


def malware_pool(seed: int = 0, rows: int = _MALWARE_ROWS) -> Pool:
    """``rows`` fresh apps from the malware scenario's world for build seed ``seed``."""
    from bastion.scenarios.malware import generate

    data = generate(_MALWARE_OFFSET + rows, seed)
    x = np.ascontiguousarray(data.x[_MALWARE_OFFSET:], dtype=np.float32)
    return Pool("malware", x, f"malware.generate(seed={seed}) rows {_MALWARE_OFFSET}..{_MALWARE_OFFSET + rows}: "
                f"the build's world, apps outside its train and eval sets, unlabelled", seed)


def load_pool(path: Path, input_name: str | None = None) -> Pool:
    """Rows from an .npz: the array named ``input_name``, else ``x``, else the only array
    that is not ``y`` (labels, if present, are ignored)."""
    with np.load(path, allow_pickle=False) as data:
        names = [n for n in data.files if n != "y"]
        name = input_name if input_name in data.files else ("x" if "x" in data.files else None)
        if name is None:
            if len(names) != 1:
                raise ValueError(f"{path}: cannot tell the input array among {', '.join(data.files)}")
            name = names[0]
        x = np.ascontiguousarray(data[name], dtype=np.float32)
    return Pool(Path(path).stem, x, f"{path} array '{name}', unlabelled", 0)


def pool_for(scenario: str, seed: int = 0) -> Pool:
    if scenario == "image":
        return image_pool(seed)
    if scenario == "malware":
        return malware_pool(seed)
    raise ValueError(f"no built-in query pool for {scenario!r} (have: {', '.join(POOLS)}); give --pool FILE.npz")
