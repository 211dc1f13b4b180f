"""Benchmark 4: one training iteration through VISSL's trainer, 2 ranks (gloo, CPU).

Two configs with the same hyperparameters, each trained for a few
iterations by VISSL's own engine (``launch_distributed``, 2 local ranks):

* ``plugin``: ``swav_plugin_loss`` + ``SwavPluginMultiCrop`` +
  ``swav_plugin_multicrop_collator`` + ``swav_plugin_head`` +
  ``swav_plugin_larc`` + ``swav_plugin_warmup_cosine``, the plugin's hooks;
* ``vissl``: VISSL's built-in SwAV: ``swav_loss`` + ``ImgPilToMultiCrop``,
  ``RandomHorizontalFlip``, ``ImgPilColorDistortion``, ``ImgPilGaussianBlur``,
  ``ToTensor``, ``Normalize`` + ``multicrop_collator`` + ``swav_head`` +
  ``sgd`` (VISSL's LARC, ``use_larc: true``, asserts NVIDIA Apex, which does
  not install on this stack: plain SGD, i.e. VISSL's side does *less* work
  in the optimizer) + ``cosine`` schedule, VISSL's default hooks (which add
  its SwAV prototype-normalisation and queue hooks).

Shared: the plugin's small residual CNN trunk (widths 32-64-128), head
128-512-64 with 100 prototypes, batch 32 per rank, reduced resolution
2x56 + 6x24 crops (the recipe's 224/96 ratio) of the quickstart's MNIST
images, temperature 0.1, epsilon 0.05, 3 Sinkhorn iterations, crops for
assignment [0, 1], no queue, momentum 0.9, weight decay 1e-6, lr 4.8,
no prototype freezing, fp32, data loading in the training processes
(``NUM_DATALOADER_WORKERS: 0``: the iteration time includes the transforms),
one intra-op thread per rank. The plugin's monitoring hooks
(``SWAV_PLUGIN.MONITOR``), which VISSL's SwAV does not have, are off.

Timing: a hook records ``perf_counter`` and the process's CPU time at every
``on_update`` on each rank; an iteration's wall time is the time between two
updates on rank 0 (ranks synchronise in the all-reduces), its CPU time the
sum over both ranks. The first iterations (start-up) are dropped; runs of the
two configs alternate. Median over the iterations of all runs of a config.

    .venv/bin/python benchmarks/bench_train_step.py [--tiny] [--runs 2]
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# One intra-op thread per rank (2 ranks on the machine's cores; the spawned
# ranks inherit it): no oversubscription, no OpenMP spinning in the CPU time.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import _common as C  # noqa: E402

# The ranks are spawned processes that unpickle the hook generators below,
# i.e. import this module: importing the plugin here registers its
# components (and its train step) there too.
import swav_vissl_plugin  # noqa: E402,F401

FULL = dict(batch=32, iterations=14, skip=4, size_crops=[56, 24], nmb_crops=[2, 6])
TINY = dict(batch=4, iterations=4, skip=1, size_crops=[16, 8], nmb_crops=[2, 2])
MEAN = [0.485, 0.456, 0.406]
STD = [0.228, 0.224, 0.225]


# ------------------------------------------------------------- timing hook
def _timing_hook_class():
    from classy_vision.hooks.classy_hook import ClassyHook

    class IterationTimer(ClassyHook):
        on_start = ClassyHook._noop
        on_phase_start = ClassyHook._noop
        on_forward = ClassyHook._noop
        on_loss_and_meter = ClassyHook._noop
        on_backward = ClassyHook._noop
        on_step = ClassyHook._noop
        on_phase_end = ClassyHook._noop
        on_end = ClassyHook._noop

        def __init__(self, path, profile_from=None, profile_iters=0):
            super().__init__()
            self.path = path
            self.profile_from = profile_from
            self.profile_iters = profile_iters
            self.profiler = None

        def _profile(self, task, rank):
            # cProfile of rank 0 over iterations [profile_from, + profile_iters)
            if rank != 0 or self.profile_from is None:
                return
            it = int(task.iteration)
            if it == self.profile_from and self.profiler is None:
                import cProfile

                self.profiler = cProfile.Profile()
                self.profiler.enable()
            elif self.profiler is not None and it == self.profile_from + self.profile_iters:
                import io
                import pstats

                self.profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(self.profiler, stream=out)
                stats.sort_stats("tottime").print_stats(18)
                text = out.getvalue()
                text = text[text.find("ncalls"):] if "ncalls" in text else text
                header = f"rank 0, {self.profile_iters} iterations, by own time\n"
                with open(os.path.join(self.path, "profile_rank0.txt"), "w") as f:
                    f.write(header + text)
                self.profiler = None
                self.profile_from = None

        def on_update(self, task) -> None:
            rank = int(os.environ.get("RANK", 0))
            self._profile(task, rank)
            rec = {
                "iteration": int(task.iteration),
                "wall": time.perf_counter(),
                "cpu": time.process_time(),
                "loss": float(task.last_batch.loss),
            }
            with open(os.path.join(self.path, f"timing_rank{rank}.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")

    return IterationTimer


def _timer(cfg):
    profile = os.environ.get("SWAV_BENCH_PROFILE_ITERS")
    if profile:
        start, count = (int(x) for x in profile.split(","))
        return _timing_hook_class()(cfg.CHECKPOINT.DIR, start, count)
    return _timing_hook_class()(cfg.CHECKPOINT.DIR)


def plugin_hooks(cfg):
    from swav_vissl_plugin.hooks import swav_plugin_hook_generator

    return swav_plugin_hook_generator(cfg) + [_timer(cfg)]


def vissl_hooks(cfg):
    from vissl.hooks import default_hook_generator

    return default_hook_generator(cfg) + [_timer(cfg)]


# ------------------------------------------------------------------ configs
def _common_overrides(data, ckpt, size):
    per_epoch = size["iterations"] * size["batch"] * 2
    return [
        f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
        f"config.DATA.TRAIN.DATA_LIMIT={per_epoch}",
        f"config.DATA.TRAIN.BATCHSIZE_PER_REPLICA={size['batch']}",
        "config.DATA.NUM_DATALOADER_WORKERS=0",
        "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
        "config.OPTIMIZER.num_epochs=1",
        f"config.CHECKPOINT.DIR={ckpt}",
        "config.CHECKPOINT.CHECKPOINT_FREQUENCY=100",
        "config.LOG_FREQUENCY=1000",
        "config.SEED_VALUE=0",
        "config.MODEL.SYNC_BN_CONFIG.CONVERT_BN_TO_SYNC_BN=false",
        "config.MODEL.AMP_PARAMS.USE_AMP=false",
        "config.OPTIMIZER.weight_decay=0.000001",
        "config.OPTIMIZER.momentum=0.9",
    ]


def _crops(size):
    return ",".join(str(x) for x in size["size_crops"]), ",".join(str(x) for x in size["nmb_crops"])


def plugin_config(data, ckpt, size):
    from swav_vissl_plugin.config import compose

    sizes, nmb = _crops(size)
    over = _common_overrides(data, ckpt, size) + [
        "config=swav_plugin/pretrain/swav_quickstart",
        "config.DATA.TRAIN.TRANSFORMS=[{name:SwavPluginMultiCrop,nmb_crops:[%s],size_crops:[%s],"
        "min_scale_crops:[0.14,0.05],max_scale_crops:[1.0,0.14],mean:%s,std:%s}]" % (nmb, sizes, MEAN, STD),
        # the plugin's monitors (collapse detector, cluster statistics, kNN)
        # have no counterpart in VISSL's SwAV: off, as in the comparison
        "++config.SWAV_PLUGIN.MONITOR.ENABLED=false",
        "++config.SWAV_PLUGIN.MONITOR.KNN.ENABLED=false",
        "config.LOSS.swav_plugin_loss.freeze_prototypes_niters=0",
        "config.LOSS.swav_plugin_loss.queue_length=0",
        "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
        "config.OPTIMIZER.param_schedulers.lr.base_lr=4.8",
        "config.OPTIMIZER.param_schedulers.lr.final_lr=0.0048",
    ]
    return compose(over, dump_config=False)[1]


def vissl_config(data, ckpt, size):
    from swav_vissl_plugin.config import compose

    sizes, nmb = _crops(size)
    total = sum(size["nmb_crops"])
    transforms = (
        "[{name:ImgPilToMultiCrop,total_num_crops:%d,size_crops:[%s],num_crops:[%s],"
        "crop_scales:[[0.14,1.0],[0.05,0.14]]},"
        "{name:RandomHorizontalFlip,p:0.5},"
        "{name:ImgPilColorDistortion,strength:1.0},"
        "{name:ImgPilGaussianBlur,p:0.5,radius_min:0.1,radius_max:2.0},"
        "{name:ToTensor},"
        "{name:Normalize,mean:%s,std:%s}]" % (total, sizes, nmb, MEAN, STD)
    )
    over = _common_overrides(data, ckpt, size) + [
        "config=swav_plugin/pretrain/swav_quickstart",
        f"config.DATA.TRAIN.TRANSFORMS={transforms}",
        "config.DATA.TRAIN.COLLATE_FUNCTION=multicrop_collator",
        "config.TRAINER.TRAIN_STEP_NAME=standard_train_step",
        "config.MODEL.HEAD.PARAMS=[[swav_head,{dims:[128,512,64],use_bn:true,num_clusters:[100]}]]",
        "config.MODEL.TEMP_FROZEN_PARAMS_ITER_MAP=[]",
        "config.LOSS.name=swav_loss",
        "config.LOSS.swav_loss.temperature=0.1",
        "config.LOSS.swav_loss.epsilon=0.05",
        "config.LOSS.swav_loss.num_iters=3",
        "config.LOSS.swav_loss.crops_for_assign=[0,1]",
        "config.LOSS.swav_loss.use_double_precision=false",
        "config.LOSS.swav_loss.queue.queue_length=0",
        "config.OPTIMIZER.name=sgd",
        "config.OPTIMIZER.use_larc=false",
        "config.OPTIMIZER.param_schedulers.lr={name:cosine,start_value:4.8,end_value:0.0048,"
        "update_interval:step,auto_lr_scaling:{auto_scale:false,base_value:0.3,base_lr_batch_size:256}}",
    ]
    return compose(over, dump_config=False)[1]


# ---------------------------------------------------------------------- run
def run_once(kind, data, workdir, size, index):
    from vissl.utils.distributed_launcher import launch_distributed

    ckpt = os.path.join(workdir, f"{kind}{index}")
    os.makedirs(ckpt, exist_ok=True)
    cfg = (plugin_config if kind == "plugin" else vissl_config)(data, ckpt, size)
    hooks = plugin_hooks if kind == "plugin" else vissl_hooks
    launch_distributed(cfg, node_id=0, engine_name="train", hook_generator=hooks)
    profile = None
    prof_path = os.path.join(ckpt, "profile_rank0.txt")
    if os.path.exists(prof_path):
        with open(prof_path) as f:
            profile = f.read()
    recs = []
    for rank in (0, 1):
        with open(os.path.join(ckpt, f"timing_rank{rank}.jsonl")) as f:
            recs.append([json.loads(line) for line in f])
    r0, r1 = recs
    n = min(len(r0), len(r1))
    wall, cpu, losses = [], [], []
    for i in range(max(1, size["skip"]), n):
        wall.append(r0[i]["wall"] - r0[i - 1]["wall"])
        cpu.append((r0[i]["cpu"] - r0[i - 1]["cpu"]) + (r1[i]["cpu"] - r1[i - 1]["cpu"]))
    losses = [r["loss"] for r in r0]
    return {"wall": wall, "cpu": cpu, "losses": losses, "iterations": n, "profile": profile}


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None, help="runs per config (alternating)")
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    size = TINY if args.tiny else FULL
    runs = args.runs or (1 if args.tiny else 2)
    import swav_vissl_plugin  # noqa: F401
    from swav_vissl_plugin.quickstart import prepare_image_folder

    workdir = args.workdir or tempfile.mkdtemp(prefix="swav_bench_train_")
    data = prepare_image_folder(os.path.join(workdir, "mnist5k"))["train"]
    info = C.machine_info(threads=None)
    per_kind = {"plugin": {"wall": [], "cpu": [], "losses": []}, "vissl": {"wall": [], "cpu": [], "losses": []}}
    profiles = {}
    for index in range(runs):
        for kind in (("plugin", "vissl") if index % 2 == 0 else ("vissl", "plugin")):
            # profile rank 0 in the last run of each config
            if args.profile and index == runs - 1:
                os.environ["SWAV_BENCH_PROFILE_ITERS"] = "%d,%d" % (size["skip"], size["iterations"] - size["skip"] - 1)
            else:
                os.environ.pop("SWAV_BENCH_PROFILE_ITERS", None)
            out = run_once(kind, data, workdir, size, index)
            if out["profile"]:
                profiles[kind] = out["profile"]
            per_kind[kind]["wall"].extend(out["wall"])
            per_kind[kind]["cpu"].extend(out["cpu"])
            per_kind[kind]["losses"].append(out["losses"])
    info["load_after"] = C.load_avg()
    timing = {}
    for measure in ("wall", "cpu"):
        summ = {kind: {
            "median": statistics.median(v[measure]),
            "p25": C.percentile(v[measure], 0.25),
            "p75": C.percentile(v[measure], 0.75),
            "min": min(v[measure]),
            "iterations": len(v[measure]),
        } for kind, v in per_kind.items()}
        timing[measure] = {
            "summary": summ,
            "ratios": {"plugin/vissl": {"of_medians": summ["plugin"]["median"] / summ["vissl"]["median"]}},
        }
    result = {
        "benchmark": "train_step",
        "command": C.command_line(),
        "machine": info,
        "runs_per_config": runs,
        "settings": size,
        "timing": timing,
        "losses": {k: v["losses"] for k, v in per_kind.items()},
        "targets": {"plugin/vissl": 0.9},
        "workdir": workdir,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if profiles:
        result["profiles"] = profiles
    C.write_json(args.json, result)
    print(report(result))
    for kind, text in profiles.items():
        print(f"\n#### profile {kind}\n```\n{text}\n```")
    return result


def report(result):
    rows = []
    for measure in ("wall", "cpu"):
        s = result["timing"][measure]["summary"]
        r = result["timing"][measure]["ratios"]["plugin/vissl"]["of_medians"]
        label = "wall (rank 0)" if measure == "wall" else "CPU (both ranks)"
        rows.append([label, C.fmt_row_time(s["plugin"]), C.fmt_row_time(s["vissl"]), "%.3f" % r,
                     f"{s['plugin']['iterations']} / {s['vissl']['iterations']}"])
    return C.md_table(
        ["time per iteration", "plugin config", "VISSL built-in SwAV", "plugin/VISSL (target <= 0.9)",
         "iterations measured"],
        rows,
    )


if __name__ == "__main__":
    main()
