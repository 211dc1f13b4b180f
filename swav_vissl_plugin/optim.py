"""SwAV's optimizer (SGD + LARC, no Apex) and learning-rate schedule for VISSL.

Recipe (``docs/recipe.md``, "Shared by all SwAV rows"):

* ``optimizer`` row: "SGD momentum 0.9 wrapped by LARC: trust_coefficient
  0.001, clip False, eps 1e-8";
* ``wd`` row: "1e-6 (applied to every parameter, biases and BN included)";
* ``lr schedule`` row: "per iteration: linear warmup from start_warmup to
  base_lr over warmup_epochs (numpy linspace, endpoints included), then cosine
  from base_lr to final_lr over the remaining epochs";
* "base_lr 4.8 at 4096 [...] the 0.3-per-256 linear rule": :func:`scale_lr`.

What this module adds to VISSL / ClassyVision
---------------------------------------------
``@register_optimizer("swav_plugin_larc")`` -> :class:`SwavPluginLARC`
    VISSL's own ``OPTIMIZER.use_larc: true`` asserts NVIDIA Apex. Select this
    optimizer with ``OPTIMIZER.name: swav_plugin_larc`` and keep
    ``OPTIMIZER.use_larc: false`` (it *is* LARC already). It reads
    ``OPTIMIZER.momentum``, ``OPTIMIZER.nesterov``, ``OPTIMIZER.weight_decay``
    and ``OPTIMIZER.larc_config.{trust_coefficient, eps, clip}`` (plus the
    optional ``OPTIMIZER.larc_config.foreach`` and ``fused_sgd``, both
    default true).

``@register_param_scheduler("swav_plugin_warmup_cosine")`` -> :class:`SwavWarmupCosineParamScheduler`
    ``OPTIMIZER.param_schedulers.lr: {name: swav_plugin_warmup_cosine,
    update_interval: step, base_lr, final_lr, warmup_epochs, start_warmup}``
    (``auto_lr_scaling`` is ignored); ``num_epochs`` is injected by
    ClassyVision from ``OPTIMIZER.num_epochs``. Call
    :meth:`SwavWarmupCosineParamScheduler.set_iterations_per_epoch` (or
    :func:`set_schedulers_iterations_per_epoch`) at training start so that the
    scheduler returns exactly the per-iteration array of :func:`warmup_cosine_lr`.

Plain functions: :func:`warmup_cosine_lr`, :func:`scale_lr`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
from classy_vision.optim import ClassyOptimizer, register_optimizer
from classy_vision.optim.param_scheduler import (
    ClassyParamScheduler,
    UpdateInterval,
    register_param_scheduler,
)

__all__ = [
    "LARC",
    "SwavPluginLARC",
    "SwavWarmupCosineParamScheduler",
    "warmup_cosine_lr",
    "scale_lr",
    "set_schedulers_iterations_per_epoch",
    "OPTIMIZER_NAME",
    "SCHEDULER_NAME",
]

OPTIMIZER_NAME = "swav_plugin_larc"
SCHEDULER_NAME = "swav_plugin_warmup_cosine"

# Recipe "optimizer" row defaults.
DEFAULT_TRUST_COEFFICIENT = 0.001
DEFAULT_EPS = 1e-8
DEFAULT_CLIP = False
DEFAULT_MOMENTUM = 0.9

# Upper bound (elements) of the temporary ``weight_decay * p`` buffers the
# foreach LARC path allocates at once: keeps the extra memory <= 128 MiB (fp32)
# even for the wide ResNets, without falling back to per-parameter kernels.
_WD_CHUNK_NUMEL = 1 << 25


# --------------------------------------------------------------------------- #
# LARC
# --------------------------------------------------------------------------- #
def _larc_loop_(
    param_groups, trust_coefficient: float, clip: bool, eps: float
) -> None:
    """Reference per-parameter LARC (the Apex ``LARC.step`` gradient rewrite).

    For each parameter with a gradient, ``wd`` being its group's weight decay:
    if ``||p|| != 0 and ||g|| != 0``::

        adaptive_lr = trust * ||p|| / (||g|| + ||p|| * wd + eps)
        if clip: adaptive_lr = min(adaptive_lr / lr, 1)
        g += wd * p
        g *= adaptive_lr

    otherwise the gradient is left untouched (no weight decay either).
    """
    for group in param_groups:
        wd = group.get("weight_decay", 0)
        for p in group["params"]:
            if p.grad is None:
                continue
            param_norm = torch.norm(p.data)
            grad_norm = torch.norm(p.grad.data)
            if param_norm != 0 and grad_norm != 0:
                adaptive_lr = (
                    trust_coefficient
                    * param_norm
                    / (grad_norm + param_norm * wd + eps)
                )
                if clip:
                    adaptive_lr = min(adaptive_lr / group["lr"], 1)
                p.grad.data += wd * p.data
                p.grad.data *= adaptive_lr


def _chunks_by_numel(tensors: List[torch.Tensor], budget: int):
    """Yields (start, stop) index ranges whose total numel stays <= budget
    (a single tensor larger than the budget gets its own range)."""
    start, acc = 0, 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if i > start and acc + n > budget:
            yield start, i
            start, acc = i, 0
        acc += n
    if start < len(tensors):
        yield start, len(tensors)


def _larc_factors(param_groups, trust_coefficient: float, clip: bool, eps: float):
    """Phase 1 of the multi-tensor LARC: the per-parameter norms and adaptive
    factors of :func:`_larc_loop_`, with multi-tensor kernels.

    All parameter and gradient norms come from ``torch._foreach_norm`` and
    the adaptive factors from the same elementwise operations (same order,
    same dtype) as the per-parameter version; they reach the host in a
    single transfer per device (instead of the two device->host syncs per
    parameter the per-parameter ``!= 0`` tests cost).

    Returns one entry per (group, device, dtypes) bucket: ``(group, params,
    grads, device, param_norms, grad_norms, factors)``, the last three as
    Python floats (the float32 values exactly, when the parameters are
    float32)."""
    buckets = []  # (group, params, grads, device, offset, count)
    per_device: "OrderedDict[torch.device, List[torch.Tensor]]" = OrderedDict()
    per_device_len: Dict[torch.device, int] = {}
    for group in param_groups:
        wd = group.get("weight_decay", 0)
        lr = group.get("lr", None)
        by_key: "OrderedDict[Any, tuple]" = OrderedDict()
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"{OPTIMIZER_NAME} (LARC) does not support sparse gradients"
                )
            key = (p.device, p.dtype, g.dtype)
            if key not in by_key:
                by_key[key] = ([], [])
            by_key[key][0].append(p)
            by_key[key][1].append(g)
        for (device, _, _), (params, grads) in by_key.items():
            pn = torch.stack(torch._foreach_norm([p.detach() for p in params]))
            gn = torch.stack(torch._foreach_norm(grads))
            adaptive = trust_coefficient * pn / (gn + pn * wd + eps)
            if clip:
                adaptive = torch.clamp(adaptive / lr, max=1)
            info = torch.stack([pn.double(), gn.double(), adaptive.double()])
            per_device.setdefault(device, []).append(info)
            offset = per_device_len.get(device, 0)
            per_device_len[device] = offset + len(params)
            buckets.append((group, params, grads, device, offset, len(params)))
    host = {
        dev: torch.cat(infos, dim=1).cpu().tolist()
        for dev, infos in per_device.items()
    }
    out = []
    for group, params, grads, device, offset, count in buckets:
        pn_l, gn_l, ad_l = (row[offset : offset + count] for row in host[device])
        out.append((group, params, grads, device, pn_l, gn_l, ad_l))
    return out


def _fold_decay_and_scale_(ps, gs, scales, wd, device) -> None:
    """``g <- (g + wd * p) * scale`` for lists of tensors, rounding exactly
    like the per-parameter ``g += wd * p; g *= scale``: the weight-decay
    product is rounded before it is added (no fused multiply-add). On CPU
    with ``addcmul(g, p, 1, value=wd)`` (one pass, no temporary; the CPU
    kernel rounds ``wd * p``, then ``* 1`` is exact), elsewhere
    materialised in bounded chunks and added."""
    if wd != 0:
        if device.type == "cpu":
            one = torch.ones((), dtype=gs[0].dtype)
            torch._foreach_addcmul_(gs, ps, [one] * len(gs), value=wd)
        else:
            for a, b in _chunks_by_numel(ps, _WD_CHUNK_NUMEL):
                decay = torch._foreach_mul(ps[a:b], wd)
                torch._foreach_add_(gs[a:b], decay)
                del decay
    torch._foreach_mul_(gs, scales)


def _larc_foreach_(
    param_groups, trust_coefficient: float, clip: bool, eps: float
) -> None:
    """Same result as :func:`_larc_loop_`, with multi-tensor kernels:
    :func:`_larc_factors`, then ``g += wd * p; g *= adaptive_lr``
    (:func:`_fold_decay_and_scale_`) on the parameters whose two norms are
    non-zero."""
    for group, params, grads, device, pn_l, gn_l, ad_l in _larc_factors(
        param_groups, trust_coefficient, clip, eps
    ):
        keep = [i for i in range(len(params)) if pn_l[i] != 0 and gn_l[i] != 0]
        if keep:
            _fold_decay_and_scale_(
                [params[i].detach() for i in keep],
                [grads[i] for i in keep],
                [ad_l[i] for i in keep],
                group.get("weight_decay", 0),
                device,
            )


def _fused_larc_sgd_ok(optimizer) -> bool:
    """Whether :func:`_larc_fused_sgd_step_` can step ``optimizer``: a
    ``torch.optim.SGD`` built with ``fused=True`` whose groups all use
    momentum without dampening, nesterov or maximize, with float ``lr``, and
    whose parameters with a gradient are dense float32/float64 CPU tensors
    with a gradient of the same dtype."""
    if type(optimizer) is not torch.optim.SGD:
        return False
    for group in optimizer.param_groups:
        if not group.get("fused") or group.get("differentiable"):
            return False
        if group.get("momentum", 0) == 0 or group.get("dampening", 0) != 0:
            return False
        if group.get("nesterov") or group.get("maximize"):
            return False
        if isinstance(group.get("lr"), torch.Tensor):
            return False
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if (
                p.device.type != "cpu"
                or p.dtype not in (torch.float32, torch.float64)
                or g.dtype != p.dtype
                or g.is_sparse
            ):
                return False
    return True


def _larc_fused_sgd_step_(
    optimizer: torch.optim.SGD, trust_coefficient: float, clip: bool, eps: float
) -> None:
    """LARC and the SGD momentum update in one pass over each parameter (CPU).

    Computes exactly what :func:`_larc_foreach_` followed by the momentum SGD
    step (weight decay 0, dampening 0) computes::

        g' = (g + wd * p) * a        (a: LARC's adaptive factor; or g' = g,
                                      without weight decay, when ||p|| or
                                      ||g|| is 0)
        buf = momentum * buf + g'    (buf = g' on the first update)
        p = p - lr * buf

    with torch's fused SGD kernel run once per parameter with the weight
    decay ``wd`` and the dampening ``1 - a``: the kernel computes ``buf =
    momentum * buf + (1 - dampening) * (g + wd * p)``, which is the line
    above when ``1 - (1 - a) == a`` in double precision (always the case for
    a float32 factor of at least 2**-30; otherwise that parameter's gradient
    is rewritten first, as in :func:`_larc_foreach_`). A missing momentum
    buffer is created as zeros: ``0 * momentum + g' = g'`` is the first
    update. One pass over ``p``, ``g`` and ``buf`` after the two norms,
    instead of the three passes of the gradient rewrite plus the SGD pass:
    on CPU the step is bound by memory traffic. The gradients are left as
    they are (the rewrite happens inside the update). Rounding: the
    per-parameter version rounds ``(g + wd p) * a`` before adding it to
    ``momentum * buf``; the kernel's vector code may fuse that product and
    sum into one multiply-add (compiler contraction), so the result may
    differ in the last bit (relative 1e-7 in float32, per step)."""
    state = optimizer.state
    for group, params, grads, _, pn_l, gn_l, ad_l in _larc_factors(
        optimizer.param_groups, trust_coefficient, clip, eps
    ):
        wd = float(group.get("weight_decay", 0))
        kwargs = dict(
            momentum=float(group["momentum"]),
            lr=float(group["lr"]),
            nesterov=False,
            maximize=False,
            is_first_step=False,
        )
        for p, g, pn, gn, a in zip(params, grads, pn_l, gn_l, ad_l):
            pd = p.detach()
            buf = state[p].get("momentum_buffer")
            if buf is None:
                buf = torch.zeros_like(pd, memory_format=torch.preserve_format)
                state[p]["momentum_buffer"] = buf
            if pn != 0 and gn != 0:
                if 1.0 - (1.0 - a) == a:
                    torch._fused_sgd_(
                        [pd], [g], [buf], weight_decay=wd, dampening=1.0 - a, **kwargs
                    )
                    continue
                _fold_decay_and_scale_([pd], [g], [a], wd, p.device)
            torch._fused_sgd_([pd], [g], [buf], weight_decay=0.0, dampening=0.0, **kwargs)


class LARC:
    """Layer-wise Adaptive Rate Control around a torch optimizer (no Apex).

    Semantics of Apex's ``apex.parallel.LARC`` (the SwAV release's optimizer,
    recipe "optimizer" row: SGD momentum 0.9 wrapped by LARC, trust_coefficient
    0.001, clip False, eps 1e-8). On :meth:`step`, for every parameter ``p``
    whose gradient ``g`` is not ``None`` (``wd`` = its group's
    ``weight_decay``, ``lr`` = its group's ``lr``), when ``||p|| != 0`` and
    ``||g|| != 0``::

        adaptive_lr = trust_coefficient * ||p|| / (||g|| + wd * ||p|| + eps)
        if clip: adaptive_lr = min(adaptive_lr / lr, 1)
        g <- (g + wd * p) * adaptive_lr          # in place, on p.grad

    otherwise ``g`` is left as it is. Then the wrapped optimizer steps with
    every group's ``weight_decay`` temporarily set to 0 (weight decay was folded
    into the gradient above); the values are restored afterwards, also if the
    inner step raises.

    Gradients must already be unscaled: with ``torch.amp.GradScaler``, call
    ``scaler.step(...)`` (it unscales, skips on inf/NaN, then calls
    :meth:`step`), which is how VISSL's train step uses it.

    ``foreach=True`` (default) uses multi-tensor kernels (:func:`_larc_foreach_`),
    ``foreach=False`` the literal per-parameter loop; both give the same result.
    With ``foreach=True`` and a CPU ``torch.optim.SGD(fused=True)`` with
    plain momentum (the recipe's; :func:`_fused_larc_sgd_ok`), the gradient
    rewrite and the SGD update run as one fused pass per parameter
    (:func:`_larc_fused_sgd_step_`): same update up to the last bit (one
    fused multiply-add), ``p.grad`` left unchanged.

    The object quacks like a ``torch.optim.Optimizer`` (``param_groups``,
    ``state``, ``defaults``, ``step``, ``zero_grad``, ``state_dict``,
    ``load_state_dict``, ``add_param_group``); its ``state_dict`` *is* the
    inner optimizer's, so checkpoints are interchangeable with plain SGD's.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        trust_coefficient: float = DEFAULT_TRUST_COEFFICIENT,
        clip: bool = DEFAULT_CLIP,
        eps: float = DEFAULT_EPS,
        foreach: bool = True,
    ) -> None:
        if not trust_coefficient > 0:
            raise ValueError(f"LARC trust_coefficient must be > 0, got {trust_coefficient}")
        if not eps >= 0:
            raise ValueError(f"LARC eps must be >= 0, got {eps}")
        self.optim = optimizer
        self.trust_coefficient = float(trust_coefficient)
        self.clip = bool(clip)
        self.eps = float(eps)
        self.foreach = bool(foreach)

    # --- torch.optim.Optimizer-like surface -------------------------------- #
    @property
    def param_groups(self):
        return self.optim.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optim.param_groups = value

    @property
    def state(self):
        return self.optim.state

    @property
    def defaults(self):
        return self.optim.defaults

    def __getstate__(self):
        return self.__dict__.copy()

    def __setstate__(self, state):
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (
            f"LARC(trust_coefficient={self.trust_coefficient}, clip={self.clip}, "
            f"eps={self.eps}, foreach={self.foreach}, optimizer={self.optim!r})"
        )

    def state_dict(self):
        return self.optim.state_dict()

    def load_state_dict(self, state_dict):
        # A checkpoint's param groups carry SGD's "fused" flag; keep this
        # optimizer's choice (both compute the same update).
        fused = [group.get("fused") for group in self.optim.param_groups]
        self.optim.load_state_dict(state_dict)
        if len(fused) == len(self.optim.param_groups):
            for group, flag in zip(self.optim.param_groups, fused):
                if "fused" in group:
                    group["fused"] = flag

    def zero_grad(self, set_to_none: bool = True):
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optim.add_param_group(param_group)

    # --- the update ---------------------------------------------------------- #
    def adjust_gradients_(self) -> None:
        """Applies the LARC rewrite of the gradients in place (no parameter update)."""
        with torch.no_grad():
            fn = _larc_foreach_ if self.foreach else _larc_loop_
            fn(self.optim.param_groups, self.trust_coefficient, self.clip, self.eps)

    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.foreach and _fused_larc_sgd_ok(self.optim):
            with torch.no_grad():
                _larc_fused_sgd_step_(
                    self.optim, self.trust_coefficient, self.clip, self.eps
                )
            return loss
        self.adjust_gradients_()
        _align_fused_momentum_buffers_(self.optim)
        saved = []
        for group in self.optim.param_groups:
            saved.append(group.get("weight_decay", 0))
            group["weight_decay"] = 0
        try:
            self.optim.step()
        finally:
            for group, wd in zip(self.optim.param_groups, saved):
                group["weight_decay"] = wd
        return loss


def _align_fused_momentum_buffers_(optimizer) -> None:
    """Lets ``torch.optim.SGD(fused=True)`` step a group in which some
    parameters have a momentum buffer and others take their first step (the
    prototypes after their freeze): torch's fused SGD treats a group as a
    first step only when *no* parameter has a buffer, and fails otherwise.
    The missing buffers are created as zeros, so that the parameter's first
    update is ``buf = 0 * m + g = g``, ``p -= lr * buf``: what the
    per-parameter SGD's first step (``buf = g``) computes. Only for
    dampening 0 (then both are exact) and groups that step with ``fused``."""
    if not isinstance(optimizer, torch.optim.SGD):
        return
    for group in optimizer.param_groups:
        if not group.get("fused") or group.get("momentum", 0) == 0:
            continue
        if group.get("dampening", 0) != 0:
            continue
        missing, has_buffer = [], False
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state.get(p)
            if state is not None and state.get("momentum_buffer") is not None:
                has_buffer = True
            else:
                missing.append(p)
        if has_buffer:
            for p in missing:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(
                    p, memory_format=torch.preserve_format
                )


def _cfg_get(config: Mapping, key: str, default):
    try:
        value = config.get(key, default)
    except AttributeError:  # pragma: no cover - non-mapping config
        value = default
    return default if value is None else value


def _as_float(value, key: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{key} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be a number, got {value!r}") from None


def _as_bool(value, key: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def _fused_sgd_ok(param_groups) -> bool:
    """Whether ``torch.optim.SGD(fused=True)`` can take these parameters:
    floating point, on CPU or CUDA.

    The fused kernel computes the same update as the default per-parameter
    SGD (``buf = m * buf + g``, ``p = p - lr * buf``; first step ``buf =
    g``) in one pass over ``p``, ``g`` and ``buf`` instead of three (on CPU,
    where the step is bound by memory traffic, the largest part of the LARC
    step's time). Values: its vectorised body rounds exactly like the
    per-parameter ops; the few trailing elements of a tensor that do not fill
    a SIMD vector may be computed with a fused multiply-add, i.e. differ by
    at most one rounding (1 ulp) per step. ``larc_config.fused_sgd: false``
    keeps torch's default SGD."""
    for group in param_groups:
        params = group["params"] if isinstance(group, Mapping) else [group]
        if isinstance(params, torch.Tensor):
            params = [params]
        for p in params:
            if not isinstance(p, torch.Tensor) or not p.is_floating_point():
                return False
            if p.device.type not in ("cpu", "cuda"):
                return False
    return True


@register_optimizer(OPTIMIZER_NAME)
class SwavPluginLARC(ClassyOptimizer):
    """ClassyVision optimizer ``swav_plugin_larc``: SGD wrapped by :class:`LARC`.

    Recipe "optimizer" row: "SGD momentum 0.9 wrapped by LARC: trust_coefficient
    0.001, clip False, eps 1e-8"; "wd" row: "1e-6 (applied to every parameter,
    biases and BN included)" (set ``OPTIMIZER.regularize_bn: true`` and
    ``OPTIMIZER.regularize_bias: true`` so VISSL's
    ``get_optimizer_param_groups`` gives every group ``OPTIMIZER.weight_decay``).

    Config (the whole ``OPTIMIZER`` node, as VISSL's ``build_optimizer`` passes it):
    ``name: swav_plugin_larc``, ``use_larc: false`` (required: VISSL asserts Apex
    when true), ``momentum`` (default 0.9), ``nesterov`` (false),
    ``weight_decay`` (0.0), ``larc_config: {trust_coefficient: 0.001, eps: 1e-8,
    clip: false, foreach: true, fused_sgd: true}``; ``lr`` is optional (the ``lr`` param
    scheduler sets it every step). Per-group ``lr`` / ``weight_decay`` come from
    the param groups VISSL builds.

    ``get_classy_state`` / ``set_classy_state`` are ClassyOptimizer's: they
    save / load the inner ``torch.optim.SGD`` state dict (momentum buffers and
    group hyper-parameters), the same format VISSL writes for ``sgd``.
    """

    def __init__(
        self,
        lr: float = 0.1,
        momentum: float = DEFAULT_MOMENTUM,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        trust_coefficient: float = DEFAULT_TRUST_COEFFICIENT,
        eps: float = DEFAULT_EPS,
        clip: bool = DEFAULT_CLIP,
        foreach: bool = True,
        fused_sgd: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"OPTIMIZER.momentum must be in [0, 1), got {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError("OPTIMIZER.nesterov: true needs OPTIMIZER.momentum > 0")
        if weight_decay < 0:
            raise ValueError(f"OPTIMIZER.weight_decay must be >= 0, got {weight_decay}")
        if lr < 0:
            raise ValueError(f"OPTIMIZER.lr must be >= 0, got {lr}")
        if not trust_coefficient > 0:
            raise ValueError(
                "OPTIMIZER.larc_config.trust_coefficient must be > 0, "
                f"got {trust_coefficient}"
            )
        if eps < 0:
            raise ValueError(f"OPTIMIZER.larc_config.eps must be >= 0, got {eps}")
        self._lr = lr
        self._momentum = momentum
        self._weight_decay = weight_decay
        self._nesterov = nesterov
        self._trust_coefficient = trust_coefficient
        self._eps = eps
        self._clip = clip
        self._foreach = foreach
        self._fused_sgd = fused_sgd

    def prepare(self, param_groups) -> None:
        if not isinstance(param_groups, (list, tuple)):
            param_groups = list(param_groups)
        # fused_sgd: SGD's one-pass kernel (see _fused_sgd_ok).
        sgd = torch.optim.SGD(
            param_groups,
            lr=self._lr,
            momentum=self._momentum,
            dampening=0,
            weight_decay=self._weight_decay,
            nesterov=self._nesterov,
            fused=True if self._fused_sgd and _fused_sgd_ok(param_groups) else None,
        )
        self.optimizer = LARC(
            sgd,
            trust_coefficient=self._trust_coefficient,
            clip=self._clip,
            eps=self._eps,
            foreach=self._foreach,
        )

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SwavPluginLARC":
        if _cfg_get(config, "use_larc", False):
            raise ValueError(
                f"OPTIMIZER.use_larc must be false with OPTIMIZER.name: {OPTIMIZER_NAME} "
                "(this optimizer is LARC already; VISSL's use_larc needs NVIDIA Apex)"
            )
        larc = _cfg_get(config, "larc_config", {}) or {}
        known = {"trust_coefficient", "eps", "clip", "foreach", "fused_sgd"}
        unknown = sorted(set(larc.keys()) - known)
        if unknown:
            raise ValueError(
                f"OPTIMIZER.larc_config has unknown key(s) {unknown}; known: {sorted(known)}"
            )
        return cls(
            lr=_as_float(_cfg_get(config, "lr", 0.1), "OPTIMIZER.lr"),
            momentum=_as_float(
                _cfg_get(config, "momentum", DEFAULT_MOMENTUM), "OPTIMIZER.momentum"
            ),
            weight_decay=_as_float(
                _cfg_get(config, "weight_decay", 0.0), "OPTIMIZER.weight_decay"
            ),
            nesterov=_as_bool(_cfg_get(config, "nesterov", False), "OPTIMIZER.nesterov"),
            trust_coefficient=_as_float(
                _cfg_get(larc, "trust_coefficient", DEFAULT_TRUST_COEFFICIENT),
                "OPTIMIZER.larc_config.trust_coefficient",
            ),
            eps=_as_float(_cfg_get(larc, "eps", DEFAULT_EPS), "OPTIMIZER.larc_config.eps"),
            clip=_as_bool(_cfg_get(larc, "clip", DEFAULT_CLIP), "OPTIMIZER.larc_config.clip"),
            foreach=_as_bool(_cfg_get(larc, "foreach", True), "OPTIMIZER.larc_config.foreach"),
            fused_sgd=_as_bool(
                _cfg_get(larc, "fused_sgd", True), "OPTIMIZER.larc_config.fused_sgd"
            ),
        )


# --------------------------------------------------------------------------- #
# Learning-rate schedule
# --------------------------------------------------------------------------- #
def warmup_cosine_lr(
    base_lr: float,
    final_lr: float,
    epochs: int,
    iterations_per_epoch: int,
    warmup_epochs: int = 0,
    start_warmup: float = 0.0,
) -> np.ndarray:
    """Per-iteration learning rates of the SwAV release (recipe "lr schedule" row).

    ``np.linspace(start_warmup, base_lr, iterations_per_epoch * warmup_epochs)``
    (endpoints included), followed, for ``t`` in
    ``range(T)``, ``T = iterations_per_epoch * (epochs - warmup_epochs)``, by
    ``final_lr + 0.5 * (base_lr - final_lr) * (1 + cos(pi * t / T))``
    (evaluated with ``math.cos``, as the release does). Length
    ``epochs * iterations_per_epoch``, float64.
    """
    epochs = int(epochs)
    n = int(iterations_per_epoch)
    warmup_epochs = int(warmup_epochs)
    warmup = np.linspace(start_warmup, base_lr, n * warmup_epochs)
    total = n * (epochs - warmup_epochs)
    half = 0.5 * (base_lr - final_lr)
    cosine = np.fromiter(
        (final_lr + half * (1 + math.cos(math.pi * t / total)) for t in range(total)),
        dtype=np.float64,
        count=max(total, 0),
    )
    return np.concatenate((warmup, cosine))


def scale_lr(lr: float, global_batch_size: int, reference_batch_size: int = 256) -> float:
    """Linear scaling rule: ``lr * global_batch_size / reference_batch_size``.

    Recipe: "base_lr 4.8 at 4096 [...] the 0.3-per-256 linear rule":
    ``scale_lr(0.3, 4096) == 4.8``; a run on fewer GPUs scales the recipe's
    base_lr / final_lr / start_warmup with
    ``scale_lr(x, new_global_batch, recipe_global_batch)``.
    """
    if isinstance(global_batch_size, bool) or int(global_batch_size) != global_batch_size or global_batch_size <= 0:
        raise ValueError(f"global_batch_size must be a positive integer, got {global_batch_size!r}")
    if reference_batch_size <= 0:
        raise ValueError(f"reference_batch_size must be > 0, got {reference_batch_size!r}")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    return lr * global_batch_size / reference_batch_size


def _validate_schedule(
    base_lr, final_lr, num_epochs, warmup_epochs, start_warmup, prefix: str
):
    """Returns the validated, typed arguments; ValueError names the bad key."""
    base_lr = _as_float(base_lr, f"{prefix}.base_lr")
    final_lr = _as_float(final_lr, f"{prefix}.final_lr")
    start_warmup = _as_float(start_warmup, f"{prefix}.start_warmup")
    for key, val in (("base_lr", base_lr), ("final_lr", final_lr), ("start_warmup", start_warmup)):
        if not math.isfinite(val) or val < 0:
            raise ValueError(f"{prefix}.{key} ({val}) must be a finite number >= 0")
    ne = _as_float(num_epochs, "OPTIMIZER.num_epochs")
    if not ne.is_integer() or ne < 1:
        raise ValueError(f"OPTIMIZER.num_epochs ({num_epochs}) must be an integer >= 1")
    we = _as_float(warmup_epochs, f"{prefix}.warmup_epochs")
    if not we.is_integer() or we < 0:
        raise ValueError(f"{prefix}.warmup_epochs ({warmup_epochs}) must be an integer >= 0")
    if we >= ne:
        raise ValueError(
            f"{prefix}.warmup_epochs ({int(we)}) must be < num_epochs ({int(ne)}) "
            "(OPTIMIZER.num_epochs)"
        )
    return base_lr, final_lr, int(ne), int(we), start_warmup


@register_param_scheduler(SCHEDULER_NAME)
class SwavWarmupCosineParamScheduler(ClassyParamScheduler):
    """``swav_plugin_warmup_cosine``: the SwAV per-iteration LR (recipe "lr schedule" row).

    Config, under ``OPTIMIZER.param_schedulers.lr`` (VISSL copies it to
    ``lr_head`` when ``head_optimizer_params.use_different_lr`` is false)::

        name: swav_plugin_warmup_cosine
        update_interval: step          # required (VISSL's default is "epoch")
        base_lr: 4.8                   # required
        final_lr: 0.0048               # required
        warmup_epochs: 10              # default 0, integer < num_epochs
        start_warmup: 0.3              # default 0.0
        auto_lr_scaling: {...}         # ignored (see below)

    ``num_epochs`` is injected by ClassyVision's ``build_optimizer_schedulers``
    from ``OPTIMIZER.num_epochs``. Other keys of VISSL's default ``lr`` node
    (``values``, ``milestones``, ``start_value``...) are ignored.

    ``auto_lr_scaling`` is ignored here (the scheduler is pure). Beware: with
    ``auto_lr_scaling.auto_scale: true`` VISSL's own ``infer_learning_rate``
    treats this scheduler as a "cosine" one (the name contains the word) and
    rewrites ``start_value``/``end_value``, keys this scheduler does not read,
    i.e. it silently does *not* scale. Keep VISSL's flag false while VISSL's
    inference runs and scale ``base_lr``/``final_lr``(/``start_warmup``) with
    :func:`scale_lr` in the plugin's own config inference.

    ClassyOptimizer calls the scheduler with ``where = iteration /
    (num_epochs * iterations_per_epoch)`` in [0, 1). After
    :meth:`set_iterations_per_epoch` (``n`` = optimizer steps per epoch; VISSL's
    ``task.num_batches_per_phase`` when an epoch is one phase) it returns
    ``warmup_cosine_lr(...)[round(where * num_epochs * n)]`` (index clamped),
    i.e. exactly the release's array value at every iteration. Before that,
    it evaluates the continuous limit of the same formula (``e = where *
    num_epochs`` epochs): ``start_warmup + (base_lr - start_warmup) * e /
    warmup_epochs`` during warmup, then ``final_lr + 0.5 * (base_lr -
    final_lr) * (1 + cos(pi * (e - warmup_epochs) / (num_epochs -
    warmup_epochs)))`` -- it agrees with the array at where=0 and at the
    warmup/cosine boundary, and differs by O(1/n) within warmup.
    """

    CONFIG_PREFIX = "OPTIMIZER.param_schedulers.lr"

    def __init__(
        self,
        base_lr: float,
        final_lr: float,
        num_epochs: int,
        warmup_epochs: int = 0,
        start_warmup: float = 0.0,
        update_interval: UpdateInterval = UpdateInterval.STEP,
    ) -> None:
        super().__init__(update_interval=update_interval)
        (
            self.base_lr,
            self.final_lr,
            self.num_epochs,
            self.warmup_epochs,
            self.start_warmup,
        ) = _validate_schedule(
            base_lr, final_lr, num_epochs, warmup_epochs, start_warmup, self.CONFIG_PREFIX
        )
        self.iterations_per_epoch: Optional[int] = None
        self.lr_schedule: Optional[np.ndarray] = None

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "SwavWarmupCosineParamScheduler":
        p = cls.CONFIG_PREFIX
        for key in ("base_lr", "final_lr"):
            if config.get(key, None) is None:
                raise ValueError(f"{p}.{key} is required for name: {SCHEDULER_NAME}")
        if config.get("num_epochs", None) is None:
            raise ValueError(
                f"{p}.num_epochs missing: ClassyVision's build_optimizer_schedulers "
                "injects it from OPTIMIZER.num_epochs"
            )
        interval = str(config.get("update_interval", "step")).lower()
        if interval != "step":
            raise ValueError(
                f"{p}.update_interval must be 'step' for {SCHEDULER_NAME} (the SwAV "
                f"schedule is per iteration), got {config.get('update_interval')!r}"
            )
        return cls(
            base_lr=config["base_lr"],
            final_lr=config["final_lr"],
            num_epochs=config["num_epochs"],
            warmup_epochs=config.get("warmup_epochs", 0),
            start_warmup=config.get("start_warmup", 0.0),
            update_interval=UpdateInterval.STEP,
        )

    def set_iterations_per_epoch(self, iterations_per_epoch: int) -> None:
        """Switches to the exact per-iteration array (see class docstring)."""
        if (
            isinstance(iterations_per_epoch, bool)
            or int(iterations_per_epoch) != iterations_per_epoch
            or iterations_per_epoch < 1
        ):
            raise ValueError(
                f"iterations_per_epoch must be a positive integer, got {iterations_per_epoch!r}"
            )
        n = int(iterations_per_epoch)
        if n == self.iterations_per_epoch:
            return
        self.lr_schedule = warmup_cosine_lr(
            self.base_lr,
            self.final_lr,
            self.num_epochs,
            n,
            self.warmup_epochs,
            self.start_warmup,
        )
        self.iterations_per_epoch = n

    def _continuous(self, where: float) -> float:
        e = where * self.num_epochs
        w = self.warmup_epochs
        if w > 0 and e < w:
            return self.start_warmup + (self.base_lr - self.start_warmup) * e / w
        frac = (e - w) / (self.num_epochs - w)
        frac = min(max(frac, 0.0), 1.0)
        return self.final_lr + 0.5 * (self.base_lr - self.final_lr) * (
            1 + math.cos(math.pi * frac)
        )

    def __call__(self, where: float) -> float:
        if self.lr_schedule is None:
            return self._continuous(where)
        idx = int(round(where * self.num_epochs * self.iterations_per_epoch))
        idx = min(max(idx, 0), len(self.lr_schedule) - 1)
        return float(self.lr_schedule[idx])


def set_schedulers_iterations_per_epoch(target, iterations_per_epoch: int) -> int:
    """Calls ``set_iterations_per_epoch`` on every :class:`SwavWarmupCosineParamScheduler`
    reachable from ``target`` and returns how many distinct ones it found.

    ``target`` may be a scheduler, a dict of schedulers (VISSL's
    ``task.optimizer_schedulers``), a ClassyOptimizer (its param-group
    schedulers), a VISSL task (both of the above), or an iterable of these.
    Meant for a training-start hook: ``set_schedulers_iterations_per_epoch(task,
    task.num_batches_per_phase)`` (multiply by the train phases per epoch if an
    epoch spans several phases).
    """
    found: Dict[int, SwavWarmupCosineParamScheduler] = {}

    def visit(obj, depth=0):
        if obj is None or depth > 4:
            return
        if isinstance(obj, SwavWarmupCosineParamScheduler):
            found[id(obj)] = obj
        elif isinstance(obj, ClassyOptimizer):
            for pg in obj._param_group_schedulers or []:
                for k, v in pg.items():
                    if k != "params":
                        visit(v, depth + 1)
        elif isinstance(obj, Mapping):
            for v in obj.values():
                visit(v, depth + 1)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, depth + 1)
        elif hasattr(obj, "optimizer_schedulers") or hasattr(obj, "optimizer"):
            visit(getattr(obj, "optimizer_schedulers", None), depth + 1)
            visit(getattr(obj, "optimizer", None), depth + 1)

    visit(target)
    for sched in found.values():
        sched.set_iterations_per_epoch(iterations_per_epoch)
    return len(found)
