"""The random-number streams of one process, as checkpoint content.

What is computed
----------------
:func:`capture` returns the state of every generator a training process draws
from (torch's CPU generator, the current CUDA device's generator when CUDA
is in use, NumPy's legacy global ``RandomState``, Python's ``random``) as a
dict of tensors, ints, floats, ``None`` and tuples only, so that a checkpoint
holding it still loads with ``torch.load(weights_only=True)``
(``checkpoint["swav_plugin"]["rng"][rank]``, docs/checkpointing.md).
:func:`restore` puts such a dict back.

Why
---
After a resume, the trainer must draw the same random numbers as the run
that was interrupted (docs/checkpointing.md, "What is exact"): the data
loader's base seed, the augmentations of a data source without per-sample
streams, the k-means initialisation of DeepCluster-v2. VISSL seeds these
generators once at start (``set_seeds``) and never saves them.
"""

import hashlib
import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["capture", "restore", "digest"]


def _cuda_in_use() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def capture() -> Dict[str, Any]:
    """This process's generator states (see the module docstring)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if _cuda_in_use() else [],
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": (int(version), tuple(int(v) for v in internal), gauss_next),
    }


def restore(state: Dict[str, Any]) -> None:
    """Set this process's generators to ``state`` (from :func:`capture`).

    The CUDA state is restored only when this process uses CUDA and the
    state has one (a CPU checkpoint resumed on GPU keeps its CUDA seed)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and _cuda_in_use():
        torch.cuda.set_rng_state(state["cuda"][0])
    n = state["numpy"]
    np.random.set_state(
        (
            n["kind"],
            n["keys"].numpy().astype(np.uint32),
            int(n["pos"]),
            int(n["has_gauss"]),
            float(n["cached_gaussian"]),
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss_next))


def digest() -> str:
    """A short fingerprint of this process's current generator states, to
    compare two runs' streams without storing them."""
    s = capture()
    h = hashlib.sha256()
    h.update(s["torch"].numpy().tobytes())
    for t in s["cuda"]:
        h.update(t.numpy().tobytes())
    h.update(s["numpy"]["keys"].numpy().tobytes())
    h.update(repr((s["numpy"]["pos"], s["numpy"]["has_gauss"], s["numpy"]["cached_gaussian"], s["python"])).encode())
    return h.hexdigest()[:16]
