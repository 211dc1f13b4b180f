"""Benchmark 3: one LARC optimizer step over ResNet-50 + SwAV head parameters.

* ``plugin``: ``swav_plugin_larc`` as VISSL builds it
  (:class:`swav_vissl_plugin.optim.SwavPluginLARC`: multi-tensor LARC around
  ``torch.optim.SGD``);
* ``loop``: the per-parameter loop of Apex's ``LARC.step`` (the SwAV
  release's optimizer), written out here, around ``torch.optim.SGD`` with
  its defaults.

Both: momentum 0.9, weight decay 1e-6 on every parameter, trust 0.001, eps
1e-8, clip false, lr 4.8. Parameters: torchvision ResNet-50 (the trunk of the
recipe) + the SwAV head (2048-2048-BN-ReLU-128 MLP, 3000 prototypes): 25.9 M
values in 167 tensors. One timed call = one ``step()`` (gradients are
already there; the loop rewrites them, as in training; the plugin's fused
CPU path leaves them as they are). Values: both run 3 steps from the same
parameters, gradients and momentum; the parameters must agree within 1e-6
relative (per tensor, relative to its largest entry): the plugin's fused
kernel may compute ``momentum * buf + a * g`` with one multiply-add where
the loop rounds twice (1 float32 ulp).

    .venv/bin/python benchmarks/bench_larc.py [--tiny]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import _common as C  # noqa: E402

LR, MOMENTUM, WD, TRUST, EPS = 4.8, 0.9, 1e-6, 0.001, 1e-8


def swav_resnet50_params(tiny=False):
    """(name, shape) of ResNet-50 + SwAV head parameters (or a tiny stand-in)."""
    import torchvision

    if tiny:
        trunk = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
        feat, hidden, out, k = 8, 16, 4, 10
    else:
        trunk = torchvision.models.resnet50()
        trunk.fc = torch.nn.Identity()
        feat, hidden, out, k = 2048, 2048, 128, 3000
    head = torch.nn.Sequential(
        torch.nn.Linear(feat, hidden),
        torch.nn.BatchNorm1d(hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, out),
    )
    protos = torch.nn.Linear(out, k, bias=False)
    model = torch.nn.ModuleDict({"trunk": trunk, "head": head, "prototypes": protos})
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


def make_state(shapes, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    for _, shape in shapes:
        p = torch.randn(shape, generator=g) * 0.05
        params.append(p.to(device))
        grads.append((torch.randn(shape, generator=g) * 1e-3).to(device))
    return params, grads


class ApexLoopLARC:
    """Apex ``apex.parallel.LARC`` (the SwAV release's), verbatim logic."""

    def __init__(self, optimizer, trust_coefficient=0.02, clip=True, eps=1e-8):
        self.optim = optimizer
        self.trust_coefficient = trust_coefficient
        self.eps = eps
        self.clip = clip

    @property
    def param_groups(self):
        return self.optim.param_groups

    def step(self):
        with torch.no_grad():
            weight_decays = []
            for group in self.optim.param_groups:
                weight_decay = group["weight_decay"] if "weight_decay" in group else 0
                weight_decays.append(weight_decay)
                group["weight_decay"] = 0
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    param_norm = torch.norm(p.data)
                    grad_norm = torch.norm(p.grad.data)
                    if param_norm != 0 and grad_norm != 0:
                        adaptive_lr = (
                            self.trust_coefficient
                            * (param_norm)
                            / (grad_norm + param_norm * weight_decay + self.eps)
                        )
                        if self.clip:
                            adaptive_lr = min(adaptive_lr / group["lr"], 1)
                        p.grad.data += weight_decay * p.data
                        p.grad.data *= adaptive_lr
        self.optim.step()
        for i, group in enumerate(self.optim.param_groups):
            group["weight_decay"] = weight_decays[i]


def build(kind, params, grads):
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    if kind == "plugin":
        from swav_vissl_plugin.optim import SwavPluginLARC

        opt = SwavPluginLARC(
            lr=LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=TRUST, eps=EPS, clip=False
        )
        opt.prepare([{"params": ps, "lr": LR, "weight_decay": WD}])
        return ps, opt.optimizer
    sgd = torch.optim.SGD([{"params": ps}], lr=LR, momentum=MOMENTUM, weight_decay=WD)
    return ps, ApexLoopLARC(sgd, trust_coefficient=TRUST, clip=False, eps=EPS)


def main(argv=None):
    p = C.base_parser(__doc__.splitlines()[0])
    args = p.parse_args(argv)
    C.setup_torch(args.threads)
    info = C.machine_info(args.threads)
    shapes = swav_resnet50_params(args.tiny)
    params, grads = make_state(shapes, device=args.device)
    numel = sum(t.numel() for t in params)

    # Values: 3 steps each from the same state.
    finals = {}
    for kind in ("plugin", "loop"):
        ps, opt = build(kind, params, grads)
        for _ in range(3):
            for p_, g in zip(ps, grads):
                p_.grad.copy_(g)
            opt.step()
        finals[kind] = [p_.detach().clone() for p_ in ps]
    identical = all(torch.equal(a, b) for a, b in zip(finals["plugin"], finals["loop"]))
    max_diff = max(float((a - b).abs().max()) for a, b in zip(finals["plugin"], finals["loop"]))
    max_rel = max(
        float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
        for a, b in zip(finals["plugin"], finals["loop"])
    )
    del finals

    ps_plugin, opt_plugin = build("plugin", params, grads)
    ps_loop, opt_loop = build("loop", params, grads)
    fns = {"plugin": opt_plugin.step, "loop": opt_loop.step}
    rounds = args.rounds or (3 if args.tiny else 15)
    times = C.interleaved(fns, rounds=rounds, number=1 if args.tiny else 2, warmup=1,
                          sync=C.device_sync(args.device))
    info["device"] = args.device
    info["load_after"] = C.load_avg()
    result = {
        "benchmark": "larc",
        "command": C.command_line(),
        "machine": info,
        "rounds": rounds,
        "params": {"tensors": len(shapes), "values": numel},
        "values": {"identical_after_3_steps": identical, "max_abs_diff": max_diff,
                   "max_rel_diff": max_rel, "within_1e-6": max_rel <= 1e-6},
        "timing": C.analyse(times, [("plugin", "loop")]),
        "targets": {"plugin/loop": 0.5},
    }
    if args.profile:
        result["profiles"] = {name: C.torch_profile(fn, calls=3) for name, fn in fns.items()}
    C.write_json(args.json, result)
    print(report(result))
    for name, text in result.get("profiles", {}).items():
        print(f"\n#### profile {name}\n```\n{text}\n```")
    return result


def report(result):
    rows = []
    for kind in ("cpu", "wall"):
        s = result["timing"][kind]["summary"]
        r = result["timing"][kind]["ratios"]["plugin/loop"]
        rows.append([
            kind,
            f"{result['params']['tensors']} tensors, {result['params']['values'] / 1e6:.1f} M values",
            C.fmt_row_time(s["plugin"]), C.fmt_row_time(s["loop"]), C.fmt_ratio(r),
            "%.1e" % result["values"]["max_rel_diff"],
        ])
    return C.md_table(
        ["time", "parameters", "plugin (swav_plugin_larc)", "per-parameter loop (Apex LARC + SGD)",
         f"plugin/loop (target <= {result['targets']['plugin/loop']})",
         "params after 3 steps: max relative difference (target <= 1e-6)"],
        rows,
    )


if __name__ == "__main__":
    main()
