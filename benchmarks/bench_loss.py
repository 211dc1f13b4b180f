"""Benchmark 1: SwAV loss with Sinkhorn, forward + backward.

Three implementations of the same loss, on the same inputs, in one process:

* ``plugin``: ``swav_plugin_loss`` (:class:`swav_vissl_plugin.losses.swav.SwAVPluginLoss`),
  as VISSL's trainer calls it (``loss([embeddings, scores], target)``);
* ``vissl``: VISSL 0.1.6's built-in ``swav_loss`` (``vissl/losses/swav_loss.py``,
  fp32 path, ``use_double_precision: false``), with its queue scored by
  ``compute_queue_scores(head)`` as VISSL's hook does;
* ``straightforward``: the SwAV release's formulas written out
  (``distributed_sinkhorn`` verbatim, one ``log_softmax`` per (assign crop,
  other crop) pair, queue scored with ``torch.mm`` and pushed by slicing).

Settings (issue 6, benchmark 1): per-GPU batch B=64, 2x224+6x96 = 8 crops,
K=3000 prototypes, D=128, crops_for_assign [0, 1], temperature 0.1, epsilon
0.05, 3 Sinkhorn iterations; without queue and with a 3840-embedding queue
(full, so it is used). One timed call = queue scoring (if any) + forward +
backward to the (leaf) scores + queue push. Values (loss and gradient) are
compared with a float64 evaluation of the release's formulas.

    .venv/bin/python benchmarks/bench_loss.py            # full size
    .venv/bin/python benchmarks/bench_loss.py --tiny     # smoke test
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from typing import Dict, List, Optional  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

TEMPERATURE, EPSILON, ITERS = 0.1, 0.05, 3
CROPS_FOR_ASSIGN = [0, 1]

FULL = dict(batch=64, num_crops=8, k=3000, dim=128, queue=3840)
TINY = dict(batch=8, num_crops=4, k=50, dim=16, queue=32)


# ----------------------------------------------------------------- the release
def release_sinkhorn(out: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """``distributed_sinkhorn`` of the SwAV release (one process)."""
    Q = torch.exp(out / epsilon).t()
    B = Q.shape[1]
    K = Q.shape[0]
    sum_Q = torch.sum(Q)
    Q /= sum_Q
    for _ in range(iterations):
        sum_of_rows = torch.sum(Q, dim=1, keepdim=True)
        Q /= sum_of_rows
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


class ReleaseLoss:
    """The release's training-loop loss, with its queue of embeddings."""

    def __init__(self, num_crops, crops_for_assign, temperature, epsilon, iterations, queue=None):
        self.num_crops = num_crops
        self.crops_for_assign = crops_for_assign
        self.temperature = temperature
        self.epsilon = epsilon
        self.iterations = iterations
        self.queue = queue  # (n_assign, L, D) or None

    def __call__(self, embedding, output, prototypes):
        bs = output.shape[0] // self.num_crops
        loss = 0
        for i, crop_id in enumerate(self.crops_for_assign):
            with torch.no_grad():
                out = output[bs * crop_id : bs * (crop_id + 1)].detach()
                if self.queue is not None:
                    out = torch.cat((torch.mm(self.queue[i], prototypes.t()), out))
                    self.queue[i, bs:] = self.queue[i, :-bs].clone()
                    self.queue[i, :bs] = embedding[crop_id * bs : (crop_id + 1) * bs]
                q = release_sinkhorn(out, self.epsilon, self.iterations)[-bs:]
            subloss = 0
            for v in np.delete(np.arange(self.num_crops), crop_id):
                x = output[bs * v : bs * (v + 1)] / self.temperature
                subloss -= torch.mean(torch.sum(q * F.log_softmax(x, dim=1), dim=1))
            loss += subloss / (self.num_crops - 1)
        return loss / len(self.crops_for_assign)


# ------------------------------------------------------------------- builders
def make_inputs(batch, num_crops, k, dim, queue, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(num_crops * batch, dim, generator=g, dtype=torch.float64), dim=1)
    protos = F.normalize(torch.randn(k, dim, generator=g, dtype=torch.float64), dim=1)
    scores = emb @ protos.t()
    q = None
    if queue:
        q = F.normalize(torch.randn(len(CROPS_FOR_ASSIGN), queue, dim, generator=g, dtype=torch.float64), dim=-1)
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype).contiguous()  # noqa: E731
    return cast(emb), cast(scores), cast(protos), cast(q)


def build_plugin(num_crops, k, dim, queue_len, queue, device="cpu"):
    from swav_vissl_plugin.losses.swav import SwAVPluginLoss

    loss = SwAVPluginLoss(
        num_crops=num_crops,
        crops_for_assign=CROPS_FOR_ASSIGN,
        temperature=TEMPERATURE,
        epsilon=EPSILON,
        sinkhorn_iterations=ITERS,
        nmb_prototypes=[k],
        local_queue_length=queue_len,
        epoch_queue_starts=0,
    )
    if queue_len:
        loss.on_epoch_start(0)
        loss._make_queue(dim, torch.device(device))
        loss._queue_all[0].copy_(queue)
        loss.queue_filled = queue_len
    return loss


class _Head(torch.nn.Module):
    """What VISSL's compute_queue_scores reads: ``nmb_heads`` and ``prototypes0``."""

    def __init__(self, protos):
        super().__init__()
        self.nmb_heads = 1
        self.prototypes0 = torch.nn.Linear(protos.shape[1], protos.shape[0], bias=False)
        with torch.no_grad():
            self.prototypes0.weight.copy_(protos)


def build_vissl(num_crops, k, dim, queue_len, queue, protos, device="cpu"):
    from classy_vision.generic.distributed_util import set_cpu_device
    from vissl.config import AttrDict
    from vissl.losses.swav_loss import SwAVLoss

    if torch.device(device).type == "cpu":
        set_cpu_device()  # as VISSL's CPU training does; else its Sinkhorn calls .cuda()

    cfg = AttrDict(
        {
            "temperature": TEMPERATURE,
            "use_double_precision": False,
            "normalize_last_layer": True,
            "num_iters": ITERS,
            "epsilon": EPSILON,
            "num_crops": num_crops,
            "crops_for_assign": CROPS_FOR_ASSIGN,
            "num_prototypes": [k],
            "temp_hard_assignment_iters": 0,
            "output_dir": ".",
            "embedding_dim": dim,
            "queue": {"queue_length": queue_len, "start_iter": 0, "local_queue_length": queue_len},
        }
    )
    loss = SwAVLoss(cfg).to(device)
    head = _Head(protos).to(device)
    if queue_len:
        loss.swav_criterion.local_emb_queue.copy_(queue)
    return loss, head


def run_case(batch, num_crops, k, dim, queue_len, rounds, number, profile=False, device="cpu") -> dict:
    emb, scores0, protos, queue = make_inputs(batch, num_crops, k, dim, queue_len, device=device)
    plugin = build_plugin(num_crops, k, dim, queue_len, queue, device)
    vissl, head = build_vissl(num_crops, k, dim, queue_len, queue, protos, device)
    release = ReleaseLoss(
        num_crops, CROPS_FOR_ASSIGN, TEMPERATURE, EPSILON, ITERS,
        None if not queue_len else queue.clone(),
    )
    scores = scores0.clone().requires_grad_(True)

    def call_plugin():
        scores.grad = None
        if queue_len:
            plugin.set_prototypes([protos])
        loss = plugin([emb, scores])
        loss.backward()
        return loss

    def call_vissl():
        scores.grad = None
        if queue_len:
            vissl.swav_criterion.compute_queue_scores(head)
        loss = vissl([emb, scores], None)
        loss.backward()
        return loss

    def call_release():
        scores.grad = None
        loss = release(emb, scores, protos)
        loss.backward()
        return loss

    fns = {"plugin": call_plugin, "vissl": call_vissl, "straightforward": call_release}

    # Values: first call of each from the same state, vs float64 release formulas.
    ref64 = ReleaseLoss(
        num_crops, CROPS_FOR_ASSIGN, TEMPERATURE, EPSILON, ITERS,
        None if not queue_len else queue.double().clone(),
    )
    s64 = scores0.double().clone().requires_grad_(True)
    l64 = ref64(emb.double(), s64, protos.double())
    l64.backward()
    values = {"float64_reference": float(l64.detach())}
    for name, fn in fns.items():
        loss = fn()
        loss = loss.detach()
        values[name] = {
            "loss": float(loss),
            "abs_diff_vs_float64": abs(float(loss) - float(l64)),
            "rel_diff_vs_float64": abs(float(loss) - float(l64)) / abs(float(l64)),
            "grad_max_abs_diff_vs_float64": float((scores.grad.double() - s64.grad).abs().max()),
            "grad_max_abs": float(s64.grad.abs().max()),
        }
    pair = {}
    names = list(fns)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair[f"{a}-{b}"] = abs(values[a]["loss"] - values[b]["loss"])
    values["pairwise_abs_diff"] = pair

    times = C.interleaved(fns, rounds=rounds, number=number, warmup=1, sync=C.device_sync(device))
    result = {
        "shape": dict(batch=batch, num_crops=num_crops, k=k, dim=dim, queue=queue_len),
        "values": values,
        "timing": C.analyse(times, [("plugin", "straightforward"), ("plugin", "vissl")]),
    }
    if profile:
        result["profiles"] = {name: C.torch_profile(fn, calls=3) for name, fn in fns.items()}
    return result


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    C.setup_torch(args.threads)
    size = TINY if args.tiny else FULL
    rounds = args.rounds or (3 if args.tiny else 15)
    number = 1 if args.tiny else 3
    info = C.machine_info(args.threads)
    info["device"] = args.device
    cases = {}
    for name, queue_len in (("no_queue", 0), ("queue", size["queue"])):
        cases[name] = run_case(
            size["batch"], size["num_crops"], size["k"], size["dim"], queue_len,
            rounds, number, profile=args.profile, device=args.device,
        )
    info["load_after"] = C.load_avg()
    result = {
        "benchmark": "loss",
        "command": C.command_line(),
        "machine": info,
        "rounds": rounds,
        "calls_per_round": number,
        "targets": {"plugin/straightforward": 0.5, "plugin/vissl": 0.35},
        "cases": cases,
    }
    C.write_json(args.json, result)
    print(report(result))
    if args.profile:
        for cname, case in cases.items():
            for impl, text in case.get("profiles", {}).items():
                print(f"\n#### profile {cname} / {impl}\n```\n{text}\n```")
    return result


def report(result: dict) -> str:
    t = result["targets"]
    out = []
    for kind in ("cpu", "wall"):
        rows = []
        for cname, case in result["cases"].items():
            s = case["timing"][kind]["summary"]
            r = case["timing"][kind]["ratios"]
            v = case["values"]
            rows.append(
                [
                    cname + (f" ({case['shape']['queue']})" if case["shape"]["queue"] else ""),
                    C.fmt_row_time(s["plugin"]),
                    C.fmt_row_time(s["vissl"]),
                    C.fmt_row_time(s["straightforward"]),
                    C.fmt_ratio(r["plugin/straightforward"]),
                    C.fmt_ratio(r["plugin/vissl"]),
                    "%.1e / %.1e / %.1e" % tuple(v[n]["rel_diff_vs_float64"] for n in ("plugin", "vissl", "straightforward")),
                ]
            )
        out.append(f"{kind} time per call, median (p25-p75); ratio of medians (median of per-round ratios)\n")
        out.append(
            C.md_table(
                [
                    "case",
                    "plugin",
                    "VISSL swav_loss",
                    "straightforward",
                    f"plugin/straightforward (target <= {t['plugin/straightforward']})",
                    f"plugin/VISSL (target <= {t['plugin/vissl']})",
                    "loss rel. diff vs fp64 (plugin / VISSL / straightf.)",
                ],
                rows,
            )
        )
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
