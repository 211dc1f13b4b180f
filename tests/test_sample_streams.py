"""The multi-crop crops of a sample depend only on (seed, epoch, index).

Built with VISSL's own pieces: ``build_dataset`` (GenericSSLDataset with the
``swav_plugin_disk_folder`` source and the multi-crop transform),
``build_dataloader`` (its sampler, collator, worker seeding and the
config's forkserver workers) and the task's ``set_epoch``, which is what
VISSL's trainer calls before each epoch's loader iterator. The folder holds
one unreadable file, whose replacement must be deterministic too.
"""

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

BATCH, N = 4, 12


@pytest.fixture(scope="module")
def streams(tmp_path_factory):
    from vissl.data import build_dataloader, build_dataset
    from vissl.trainer.train_task import SelfSupervisionTask

    from swav_vissl_plugin.config import compose

    root = tmp_path_factory.mktemp("streams")
    cls = root / "train" / "c"
    cls.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(N - 1):
        h, w = rng.integers(20, 48, size=2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(cls / f"{i:02d}.png")
    (cls / "05b_broken.png").write_bytes(b"")  # sorted among the others

    _, cfg = compose(
        [
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.DATA.TRAIN.DATA_PATHS=[{root / 'train'}]",
            f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={BATCH}",
            "config.DATA.TRAIN.USE_STATEFUL_DISTRIBUTED_SAMPLER=true",
            f"config.CHECKPOINT.DIR={root / 'ck'}",
        ],
        dump_config=False,
    )
    assert cfg.MULTI_PROCESSING_METHOD == "forkserver"
    start_method = multiprocessing.get_start_method(allow_none=True)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'pg'}", rank=0, world_size=1)
    dataset = build_dataset(cfg, "TRAIN")
    task = SelfSupervisionTask.from_config(cfg)
    task.datasets = {"train": dataset}

    def crops(workers: int, epoch: int, start_iter: int = 0):
        """data_idx -> (data_valid, [crop tensors]) of one epoch's batches."""
        task.dataloaders = {
            "train": build_dataloader(
                dataset=dataset, dataset_config=cfg.DATA.TRAIN, num_dataloader_workers=workers,
                pin_memory=False, multi_processing_method=cfg.MULTI_PROCESSING_METHOD,
                device=torch.device("cpu"), sampler_seed=cfg.SEED_VALUE,
            )
        }
        task.set_epoch("train", epoch, start_iter, epoch)
        out, order = {}, []
        for batch in iter(task.dataloaders["train"]):
            idx = batch["data_idx"][0][:BATCH].tolist()  # position-major: first crop of each sample
            valid = batch["data_valid"][0][:BATCH].tolist()
            for b, i in enumerate(idx):
                out[i] = (valid[b], [c[b].clone() for c in batch["data"][0]])
            order.append(idx)
        return out, order

    try:
        yield {
            "root": root,
            "cfg": cfg,
            "dataset": dataset,
            "w0_e1": crops(0, 1),
            "w0_e1_skip1": crops(0, 1, start_iter=1),
            "w0_e0": crops(0, 0),
            "w2_e1": crops(2, 1),
        }
    finally:
        torch.distributed.destroy_process_group()
        multiprocessing.set_start_method(start_method, force=True)


def _same(a, b):
    # exact: a sample's crops come from its own seed through the same code and
    # kernels, whichever worker, epoch position or resume makes them
    return a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def test_two_workers_give_the_crops_of_no_workers(streams):
    ref, _ = streams["w0_e1"]
    got, _ = streams["w2_e1"]
    assert sorted(got) == sorted(ref) == list(range(N))
    for i in ref:
        assert _same(got[i], ref[i]), i


def test_a_resumed_epoch_gives_the_same_crops(streams):
    ref, order = streams["w0_e1"]
    got, skipped_order = streams["w0_e1_skip1"]
    assert skipped_order == order[1:]  # the sampler resumed after the first batch
    for i in got:
        assert _same(got[i], ref[i]), i


def test_the_epoch_reaches_the_streams(streams):
    e1, _ = streams["w0_e1"]
    e0, _ = streams["w0_e0"]
    for i in e1:
        assert not torch.equal(e0[i][1][0], e1[i][1][0]), i


def test_crops_are_the_transform_on_the_stream_of_seed_epoch_index(streams):
    """Independent of any loader: open the stream by hand and apply the
    transform to the decoded file (for the unreadable file: the next one)."""
    from swav_vissl_plugin import sample_seed
    from swav_vissl_plugin.data_source import load_rgb
    from swav_vissl_plugin.transforms import SwavPluginMultiCrop

    ref, _ = streams["w0_e1"]
    dataset = streams["dataset"]
    source = dataset.data_objs[0]
    names = [Path(p).name for p in source.get_image_paths()]
    broken = names.index("05b_broken.png")
    assert ref[broken][0] == -1 and all(ref[i][0] == 1 for i in ref if i != broken)
    mc = SwavPluginMultiCrop.from_config(streams["cfg"].DATA.TRAIN.TRANSFORMS[0])
    for i in (0, broken, N - 1):
        file = source.image_path(i + 1 if i == broken else i)
        sample_seed.begin_sample(streams["cfg"].SEED_VALUE, 1, i)
        expected = mc(load_rgb(file))
        assert all(torch.equal(x, y) for x, y in zip(expected, ref[i][1])), i
