"""Image augmentations on the device for self-supervised training (pure; callers jit).

Every function maps `(key, images [B, H, W, C] float) -> images` of the same shape and dtype,
each image drawing its own parameters from `key`; the same key gives the same output. They
work on grayscale (C = 1) and colour (C = 3) alike, and on images already normalised by the
pipeline (`(x / 255 - mean) / std`): brightness is an additive shift and contrast a scale
about each image's mean, both in those units. `simclr_views` chains them as SimCLR does
(Chen et al. 2020, Sec. 3 and Appendix A): random resized crop, horizontal flip, then colour
jitter with probability `jitter_probability`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """SimCLR's augmentations (hashable: pass it as a static argument).

  Attributes:
    crop_scale: range of the crop's area as a fraction of the image.
    crop_ratio: range of the crop's aspect ratio (width / height), sampled log-uniformly.
    flip: random horizontal flips.
    brightness: additive shift drawn from [-brightness, brightness].
    contrast: contrast factor drawn from [1 - contrast, 1 + contrast].
    jitter_probability: probability that an image gets the brightness/contrast jitter.
  """

  crop_scale: tuple[float, float] = (0.2, 1.0)
  crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
  flip: bool = True
  brightness: float = 0.4
  contrast: float = 0.4
  jitter_probability: float = 0.8

  def __post_init__(self):
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"crop_scale={self.crop_scale}; expected 0 < low <= high <= 1")
    low, high = self.crop_ratio
    if not 0 < low <= high:
      raise ValueError(f"crop_ratio={self.crop_ratio}; expected 0 < low <= high")
    if self.brightness < 0 or not 0 <= self.contrast < 1:
      raise ValueError(
        f"brightness={self.brightness}, contrast={self.contrast}; expected brightness >= 0 "
        "and 0 <= contrast < 1"
      )
    if not 0 <= self.jitter_probability <= 1:
      raise ValueError(f"jitter_probability={self.jitter_probability}; expected in [0, 1]")


DEFAULT_AUGMENT = AugmentConfig()


def _check_images(images: jax.Array) -> None:
  if images.ndim != 4:
    raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")


def random_resized_crop(
  key: jax.Array,
  images: jax.Array,
  *,
  scale: tuple[float, float] = (0.2, 1.0),
  ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
  """A random crop of each image (area fraction in `scale`, aspect ratio in `ratio`, clipped
  to the image), resized back to the image's size with linear interpolation."""
  _check_images(images)
  batch, height, width, _ = images.shape
  area_key, ratio_key, y_key, x_key = jax.random.split(key, 4)
  area = jax.random.uniform(area_key, (batch,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(
    ratio_key, (batch,), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
  )
  aspect = jnp.exp(log_ratio)
  crop_h = jnp.clip(jnp.sqrt(area / aspect) * height, 1.0, height)
  crop_w = jnp.clip(jnp.sqrt(area * aspect) * width, 1.0, width)
  top = jax.random.uniform(y_key, (batch,)) * (height - crop_h)
  left = jax.random.uniform(x_key, (batch,)) * (width - crop_w)

  def crop_one(image, top, left, crop_h, crop_w):
    # Output pixel o samples input coordinate (o - translation) / scale.
    sy, sx = height / crop_h, width / crop_w
    return jax.image.scale_and_translate(
      image.astype(jnp.float32),
      image.shape,
      spatial_dims=(0, 1),
      scale=jnp.stack([sy, sx]),
      translation=jnp.stack([-top * sy, -left * sx]),
      method="linear",
      antialias=False,
    )

  out = jax.vmap(crop_one)(images, top, left, crop_h, crop_w)
  return out.astype(images.dtype)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2."""
  _check_images(images)
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def color_jitter(
  key: jax.Array,
  images: jax.Array,
  *,
  brightness: float = 0.4,
  contrast: float = 0.4,
  probability: float = 1.0,
) -> jax.Array:
  """Brightness shift then contrast scaling about each image's mean, per image with
  `probability` (any number of channels)."""
  _check_images(images)
  shift_key, factor_key, apply_key = jax.random.split(key, 3)
  batch = images.shape[0]
  shift = jax.random.uniform(shift_key, (batch, 1, 1, 1), minval=-brightness, maxval=brightness)
  factor = jax.random.uniform(
    factor_key, (batch, 1, 1, 1), minval=1 - contrast, maxval=1 + contrast
  )
  x = images.astype(jnp.float32) + shift
  mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  jittered = (x - mean) * factor + mean
  apply = jax.random.bernoulli(apply_key, probability, (batch, 1, 1, 1))
  return jnp.where(apply, jittered, images.astype(jnp.float32)).astype(images.dtype)


def simclr_augment(key: jax.Array, images: jax.Array, config: AugmentConfig) -> jax.Array:
  """One SimCLR view of each image: crop, flip, jitter (see `AugmentConfig`)."""
  crop_key, flip_key, jitter_key = jax.random.split(key, 3)
  out = random_resized_crop(crop_key, images, scale=config.crop_scale, ratio=config.crop_ratio)
  if config.flip:
    out = random_flip(flip_key, out)
  if config.jitter_probability > 0 and (config.brightness > 0 or config.contrast > 0):
    out = color_jitter(
      jitter_key,
      out,
      brightness=config.brightness,
      contrast=config.contrast,
      probability=config.jitter_probability,
    )
  return out


def simclr_views(
  key: jax.Array, images: jax.Array, config: AugmentConfig = DEFAULT_AUGMENT
) -> tuple[jax.Array, jax.Array]:
  """Two independently augmented views of every image (the positive pairs of SimCLR)."""
  first, second = jax.random.split(key)
  return simclr_augment(first, images, config), simclr_augment(second, images, config)
