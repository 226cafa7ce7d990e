"""SimCLR's model: a trunk and a projection MLP (Chen et al. 2020).

`SimCLRModel(trunk)(x, train, mask) -> dict(embedding [B, D], projection [B, projection_dim])`.
The contrastive loss is applied to the projection; the trunk's embedding (before the head) is
the representation kept for downstream use (M_pre's features and k-means auxiliary labels).
Any trunk with the project's interface `trunk(x, train=..., mask=...) -> [B, D]` works; its
variables sit under "trunk" as in `BGSplitModel` and `Classifier`, so the trunk can be copied
into them (`rare_jax.deep.selfsup.classifier_from_clusters`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class SimCLRModel(nn.Module):
  """Trunk + projection head `Dense(hidden_dim) -> ReLU -> Dense(projection_dim)`.

  Attributes:
    trunk: the encoder.
    projection_dim: output size of the head (SimCLR: 128).
    hidden_dim: hidden width of the head; None uses the trunk's embedding size (SimCLR).
  """

  trunk: nn.Module
  projection_dim: int = 128
  hidden_dim: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None):
    if self.projection_dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
      raise ValueError(
        f"projection_dim and hidden_dim must be >= 1, got {self.projection_dim} and "
        f"{self.hidden_dim}"
      )
    embedding = self.trunk(x, train=train, mask=mask).astype(jnp.float32)
    hidden = nn.relu(nn.Dense(self.hidden_dim or embedding.shape[-1], name="hidden")(embedding))
    projection = nn.Dense(self.projection_dim, name="projection")(hidden)
    return {"embedding": embedding, "projection": projection}
