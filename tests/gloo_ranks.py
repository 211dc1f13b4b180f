"""Starting real gloo ranks on this machine for a test.

:func:`spawn` runs ``worker(rank, folder)`` on 2 processes forked from one
forkserver that imported ``preload`` once (importing torch and the plugin in
every rank is most of a short test on 2 cores; the server never ran OpenMP
work, so forking from it is safe, unlike forking pytest itself). The worker
initialises the process group with ``init_method=f"file://{folder}/pg"``.
"""

import time

import pytest
import torch.multiprocessing as mp


def spawn(worker, folder, preload=("torch", "swav_vissl_plugin"), nprocs=2, deadline_s=180):
    """Run ``worker(rank, str(folder))`` on ``nprocs`` ranks; fail the test
    if they do not finish within ``deadline_s`` (their errors propagate)."""
    mp.set_forkserver_preload(list(preload))
    ctx = mp.start_processes(worker, args=(str(folder),), nprocs=nprocs, join=False, start_method="forkserver")
    start = time.monotonic()
    while not ctx.join(timeout=1):
        if time.monotonic() - start > deadline_s:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail("distributed workers did not finish in time")
