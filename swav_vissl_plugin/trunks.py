"""A small convolutional trunk for CPU-sized runs (quickstart, tests).

VISSL's ``resnet`` trunk starts at depth 50, which is too slow to show
learning within minutes on two CPU cores. ``swav_plugin_small_cnn`` is a
three-stage ResNet-like network (conv-BN-ReLU blocks with a residual
connection per stage, global average pooling) whose output feature is a
flat vector, exactly what the SwAV projection head and VISSL's linear
evaluation heads consume. Selected with ``MODEL.TRUNK.NAME:
swav_plugin_small_cnn``; widths under ``MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN``.
"""

from typing import List, Optional

import torch
from torch import nn
from vissl.models.model_helpers import get_trunk_forward_outputs_module_list
from vissl.models.trunks import register_model_trunk


class _Stage(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, plus a projected shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        )
        self.shortcut = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


@register_model_trunk("swav_plugin_small_cnn")
class SwavPluginSmallCNN(nn.Module):
    """A full-resolution stem, three residual stages and global average pooling.

    ``WIDTHS`` (default 32, 64, 128) and ``STRIDES`` (default 2, 2, 2) set the
    stages; 28x28 inputs end at 4x4 before pooling. Inputs ``(N, C, H, W)``
    are processed in channels-last memory order (same values, faster on CPU).

    Feature names, usable in ``out_feat_keys`` and VISSL's linear-eval
    configs: ``stem``, ``stage1``, ``stage2``, ``stage3``, ``flatten``
    (the pooled ``widths[-1]``-d vector, the default output).
    """

    def __init__(self, model_config, model_name: str):
        super().__init__()
        cfg = model_config.TRUNK.get("SWAV_PLUGIN_SMALL_CNN", {}) or {}
        widths = list(cfg.get("WIDTHS", [32, 64, 128]))
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(
                "MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.WIDTHS must be 3 positive ints, "
                f"got {widths}"
            )
        strides = list(cfg.get("STRIDES", [2, 2, 2]))
        if len(strides) != 3 or min(strides) < 1:
            raise ValueError(
                "MODEL.TRUNK.SWAV_PLUGIN_SMALL_CNN.STRIDES must be 3 positive ints, "
                f"got {strides}"
            )
        in_ch = int(cfg.get("INPUT_CHANNELS", 3))
        stem = nn.Sequential(
            nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks = [
            stem,
            _Stage(widths[0], widths[0], strides[0]),
            _Stage(widths[0], widths[1], strides[1]),
            _Stage(widths[1], widths[2], strides[2]),
            nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
        ]
        self._feature_blocks = nn.ModuleList(blocks)
        self.all_feat_names = ["stem", "stage1", "stage2", "stage3", "flatten"]
        self.output_dim = widths[-1]

    def forward(
        self, x: torch.Tensor, out_feat_keys: Optional[List[str]] = None
    ) -> List[torch.Tensor]:
        # Channels-last input selects oneDNN's NHWC convolutions: forward +
        # backward of the quickstart batch (64 x (2x28 + 4x14)) costs 0.70x the
        # CPU time of NCHW input (docs/performance.md, "Small trunk").
        x = x.contiguous(memory_format=torch.channels_last)
        return get_trunk_forward_outputs_module_list(
            x, out_feat_keys, self._feature_blocks, self.all_feat_names
        )
