"""The recipe's linear classifier as a VISSL head (recipe: "Linear evaluation").

"Frozen trunk, global average pool of res5 (2048-d, no BN), one Linear layer
(weights N(0, 0.01), bias 0)". VISSL's benchmark machinery provides the rest
(``MODEL.FEATURE_EVAL_SETTINGS``: frozen trunk in eval mode, the pooled res5
feature through ``LINEAR_EVAL_FEAT_POOL_OPS_MAP``); its own heads do not fit
the recipe exactly: ``eval_mlp`` puts a BatchNorm before the Linear layer and
``mlp`` keeps PyTorch's default uniform initialisation. This head is the
single Linear layer with the recipe's initialisation:

``MODEL.HEAD.PARAMS: [["swav_plugin_linear", {"in_dim": 2048, "num_classes": 1000}]]``

It accepts ``N x C`` or ``N x C x 1 x 1`` features (or a list holding one).
Configs: ``configs/config/swav_plugin/linear_eval/``.
"""

from typing import List, Union

import torch
from torch import nn
from vissl.models.heads import register_model_head

HEAD_NAME = "swav_plugin_linear"
INIT_STD = 0.01


@register_model_head(HEAD_NAME)
class SwAVPluginLinearClassifier(nn.Module):
    """``Linear(in_dim, num_classes)``, weights N(0, 0.01), bias 0."""

    def __init__(self, model_config, in_dim: int = 2048, num_classes: int = 1000):
        super().__init__()
        for key, val in (("in_dim", in_dim), ("num_classes", num_classes)):
            if isinstance(val, bool) or int(val) != val or int(val) < 1:
                raise ValueError(f"MODEL.HEAD.PARAMS[{HEAD_NAME}].{key} must be a positive integer, got {val!r}")
        self.in_dim = int(in_dim)
        self.linear = nn.Linear(self.in_dim, int(num_classes))
        nn.init.normal_(self.linear.weight, mean=0.0, std=INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Union[torch.Tensor, List[torch.Tensor]]) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            if len(x) != 1:
                raise ValueError(f"{HEAD_NAME} takes one feature, got {len(x)}")
            x = x[0]
        if x.ndim == 4 and x.shape[2:] == (1, 1):
            x = x.flatten(1)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"{HEAD_NAME} expects N x {self.in_dim} (or N x {self.in_dim} x 1 x 1) features, "
                f"got {tuple(x.shape)}; check in_dim against the trunk's pooled feature"
            )
        return self.linear(x)
