"""The SwAV projection head and prototypes (recipe: "head" and "prototypes" rows).

Linear(in, hidden_mlp) - BatchNorm1d - ReLU - Linear(hidden_mlp, feat_dim),
then L2 normalisation, then one bias-free ``Linear(feat_dim, K)`` per entry
of ``nmb_prototypes`` (the "prototypes"). The forward returns what
``swav_plugin_loss`` consumes: ``[embeddings, scores_head0, scores_head1, ...]``.

The prototypes are L2-normalised before every forward pass and frozen for the
first ``freeze_prototypes_niters`` iterations; both are done by
:class:`swav_vissl_plugin.hooks.SwAVPrototypesHook`, which calls
:meth:`SwAVPluginPrototypeHead.normalize_prototypes` and reads
:meth:`SwAVPluginPrototypeHead.prototype_parameters`.
"""

from typing import List, Sequence, Union

import torch
from torch import nn
from vissl.models.heads import register_model_head


@register_model_head("swav_plugin_head")
class SwAVPluginPrototypeHead(nn.Module):
    """Projection MLP + L2 normalisation + prototypes.

    Args (``MODEL.HEAD.PARAMS: [["swav_plugin_head", {...}]]``):
        in_dim: trunk output dimension (2048 for ResNet-50; 4096/8192/10240
            for the wide ResNets).
        hidden_mlp: hidden width (2048; 8192 for the wide ResNets). 0 gives
            a single Linear(in_dim, feat_dim) projection.
        feat_dim: embedding dimension (128).
        nmb_prototypes: K, or a list of K's for several prototype heads (3000).
        normalize: L2-normalise the embeddings (always true in the recipe).
    """

    def __init__(
        self,
        model_config,
        in_dim: int = 2048,
        hidden_mlp: int = 2048,
        feat_dim: int = 128,
        nmb_prototypes: Union[int, Sequence[int]] = 3000,
        normalize: bool = True,
    ):
        super().__init__()
        protos = [nmb_prototypes] if isinstance(nmb_prototypes, int) else list(nmb_prototypes)
        where = "MODEL.HEAD.PARAMS[swav_plugin_head]"
        if not protos or any(int(k) < 1 for k in protos):
            raise ValueError(f"{where}.nmb_prototypes must be positive, got {nmb_prototypes}")
        for key, val in (("in_dim", in_dim), ("feat_dim", feat_dim)):
            if int(val) < 1:
                raise ValueError(f"{where}.{key} must be positive, got {val}")
        if int(hidden_mlp) < 0:
            raise ValueError(f"{where}.hidden_mlp must be >= 0, got {hidden_mlp}")
        eps = model_config.HEAD.get("BATCHNORM_EPS", 1e-5)
        momentum = model_config.HEAD.get("BATCHNORM_MOMENTUM", 0.1)
        if hidden_mlp == 0:
            self.projection_head = nn.Linear(in_dim, feat_dim)
        else:
            self.projection_head = nn.Sequential(
                nn.Linear(in_dim, hidden_mlp),
                nn.BatchNorm1d(hidden_mlp, eps=eps, momentum=momentum),
                nn.ReLU(inplace=True),
                nn.Linear(hidden_mlp, feat_dim),
            )
        self.normalize = normalize
        self.nmb_heads = len(protos)
        # Published checkpoints name a single head `prototypes` and several
        # heads `prototypes.prototypes{i}`; keep one naming per count.
        if self.nmb_heads == 1:
            self.prototypes = nn.Linear(feat_dim, int(protos[0]), bias=False)
        else:
            self.prototypes = nn.ModuleDict(
                {f"prototypes{i}": nn.Linear(feat_dim, int(k), bias=False) for i, k in enumerate(protos)}
            )

    def prototype_layers(self) -> List[nn.Linear]:
        if self.nmb_heads == 1:
            return [self.prototypes]
        return [self.prototypes[f"prototypes{i}"] for i in range(self.nmb_heads)]

    def prototype_parameters(self) -> List[nn.Parameter]:
        return [layer.weight for layer in self.prototype_layers()]

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalise every prototype vector in place (recipe "prototypes" row)."""
        for w in self.prototype_parameters():
            w.copy_(nn.functional.normalize(w, dim=1, p=2))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() > 2:
            x = torch.flatten(x, 1)
        z = self.projection_head(x)
        if self.normalize:
            z = nn.functional.normalize(z, dim=1, p=2)
        return [z] + [layer(z) for layer in self.prototype_layers()]
