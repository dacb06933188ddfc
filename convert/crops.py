"""Training crops and augmentation: where the trainer looks on a frame, and how.

Boxed data trains on crops (convert.train): a crop centred on a defect box, on image
structure or anywhere, scale-jittered, then flipped and photometrically jittered. The masks
that label the crops' cells come through agent.preprocess, so they share the pixels' geometry.
"""

from __future__ import annotations

import dataclasses
import math

import cv2
import numpy as np

from agent.preprocess import InputSpec, preprocess

from .data import GOOD, box_mask

BOX_CENTRED = 0.7          # share of a boxed defect image's crops centred on a box
# Crops of the other images (and of defect images off their boxes): STRUCTURE_CENTRED of them
# are centred on a pixel with image structure (a local step of over STRUCTURE_STEP levels,
# marked STRUCTURE in the mask). A crop of blank background teaches nothing; a legitimate
# feature that resembles a defect is what false rejects come from.
STRUCTURE, STRUCTURE_STEP, STRUCTURE_CENTRED = 64, 32, 0.5
# Crop windows of side crop * z, z log-uniform in [1/SCALE_JITTER, SCALE_JITTER], resized to
# the crop: new products and board designs bring features of sizes the training set lacks.
SCALE_JITTER = 1.25


def crop_side(spec: InputSpec) -> int | None:
    """Side of the training crops: half the input's short side (a quarter of the pixels, so
    four times the steps per second) up to 224 px, never under 96 px (the cells' receptive
    field is ~90 px); None when the input is too small for crops to pay. On DeepPCB at 640
    px, 224 px crops (more context per crop, closer to a whole frame's statistics) beat 160
    px crops at the same pixels per epoch: test accuracy 96.8 % against 95.2 %."""
    side = min(224, (min(spec.width, spec.height) // 2) // 16 * 16)
    return side if side >= 96 else None


def n_crops(spec: InputSpec, crop: int) -> int:
    """Crops per image and epoch: about a quarter of the frame's pixels, 2 to 4 crops (an
    epoch then costs 0.5-1x a whole-frame epoch at 320 px)."""
    return int(np.clip(round(0.25 * spec.width * spec.height / crop ** 2), 2, 4))


def augmenter(spec: InputSpec, flips: bool):
    """Inspection augmentation on a uint8 batch (B, H, W, C), returning float 0..255: flips and
    (square inputs) transposes = the 8 dihedral views, brightness (+-20 levels) and contrast
    (+-15 %). A defect mask batch, when given, gets the same flips (and no photometric ones).

    No rotations or sub-pixel shifts: inspection images come from a fixtured camera, their
    interpolation blurs exactly the fine edges defects live on, and on a 2-core box the
    projective warps cost about as much as a training step."""
    import tensorflow as tf

    square = spec.width == spec.height

    def aug(x, mask=None):
        c = x.shape[-1]
        if mask is not None:
            x = tf.concat([x, mask], -1)
        b = tf.shape(x)[0]
        if flips:
            def coin():
                return tf.random.uniform([b, 1, 1, 1]) < 0.5
            x = tf.where(coin(), tf.reverse(x, [2]), x)
            x = tf.where(coin(), tf.reverse(x, [1]), x)
            if square:
                x = tf.where(coin(), tf.transpose(x, [0, 2, 1, 3]), x)
        if mask is not None:     # flipped as uint8: a quarter of the bytes of float
            x, mask = x[..., :c], tf.cast(x[..., c:], tf.float32)
        x = tf.cast(x, tf.float32)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        k = tf.random.uniform([b, 1, 1, 1], 0.85, 1.15)
        br = tf.random.uniform([b, 1, 1, 1], -20.0, 20.0)
        x = tf.clip_by_value((x - mean) * k + mean + br, 0.0, 255.0)
        return x if mask is None else (x, mask)

    return aug


def defect_masks(spec: InputSpec, boxes, classes, images):
    """Per-image uint8 masks (N, H, W, 1) in model-input geometry (through agent.preprocess,
    so ROI/fit match the pixels), and per-image weights of the cell loss: 1 where every cell
    is known (good images; defect images with boxes), 0 where only the image label is."""
    mspec = dataclasses.replace(spec, channels=1, color="gray")
    masks = np.zeros((len(images), spec.height, spec.width, 1), np.uint8)
    weights = np.zeros(len(images), np.float32)
    n_boxed = 0
    for i, (b, c, im) in enumerate(zip(boxes, classes, images)):
        if c == GOOD:
            weights[i] = 1.0
            continue
        if b:
            preprocess(box_mask(im.shape, b), mspec, out=masks[i:i + 1])
            weights[i] = 1.0
            n_boxed += 1
    return masks, weights, n_boxed


def crop_sampler(spec: InputSpec, crop: int, box_centred: float = BOX_CENTRED,
                  structure_centred: float = STRUCTURE_CENTRED, scale_jitter: float = SCALE_JITTER):
    """The tf.data map function that cuts one training crop (crop x crop) from a whole
    image: centred (with jitter) on a random box pixel for `box_centred` of the images with
    boxes, else on a random STRUCTURE pixel for `structure_centred` of the images that have
    some, else anywhere. With scale_jitter s > 1 the window's side is crop * z, z log-uniform
    in [1/s, s], resized to crop. The crop's label is what its own cells say, so a defect
    image's clean area teaches 'good' too."""
    import tensorflow as tf

    def crop_fn(x, yy, m, ww, mww):
        h, w = spec.height, spec.width
        c = crop
        if scale_jitter > 1.0:
            z = tf.exp(tf.random.uniform([], -math.log(scale_jitter), math.log(scale_jitter)))
            c = tf.minimum(tf.cast(tf.round(crop * z), tf.int32), min(h, w))
        lim = tf.stack([h - c, w - c])

        def near(where):     # (any, offset): a crop centred, with jitter, on a random pixel
            pos = tf.cast(tf.where(where), tf.int32)
            n = tf.shape(pos)[0]
            pos = tf.concat([pos, tf.zeros([1, 2], tf.int32)], 0)     # gather-safe when n == 0
            return n > 0, pos[tf.random.uniform([], 0, tf.maximum(n, 1), tf.int32)] - c // 2 + \
                tf.random.uniform([2], -(c // 4), c // 4 + 1, tf.int32)

        on_box, o_box = near(m[..., 0] > 127)
        on_struct, o_struct = near(tf.equal(m[..., 0], STRUCTURE))
        anywhere = tf.cast(tf.random.uniform([2]) * tf.cast(lim + 1, tf.float32), tf.int32)
        o = tf.where(tf.logical_and(on_struct, tf.random.uniform([]) < structure_centred),
                     o_struct, anywhere)
        o = tf.where(tf.logical_and(on_box, tf.random.uniform([]) < box_centred), o_box, o)
        o = tf.clip_by_value(o, 0, lim)
        x = x[:, o[0]:o[0] + c, o[1]:o[1] + c]
        m = m[o[0]:o[0] + c, o[1]:o[1] + c]
        if scale_jitter > 1.0:
            x = tf.cast(tf.round(tf.image.resize(x, [crop, crop], antialias=True)), tf.uint8)
            x = tf.ensure_shape(x, [1, crop, crop, spec.channels])
            m = tf.ensure_shape(tf.image.resize(m, [crop, crop], "nearest"), [crop, crop, 1])
        yy = tf.where(tf.reduce_max(m) > 127, yy, tf.zeros_like(yy))
        return x, yy, m, ww, mww

    return crop_fn


def mark_structure(X: np.ndarray, M: np.ndarray) -> None:
    """Set M to STRUCTURE where the image X (N, 1, H, W, C) has a local step of over
    STRUCTURE_STEP levels (3x3 morphological gradient), leaving box pixels as they are."""
    k = np.ones((3, 3), np.uint8)
    for i in range(len(X)):
        g = cv2.morphologyEx(X[i, 0], cv2.MORPH_GRADIENT, k)
        g = g.max(axis=-1) if g.ndim == 3 else g
        m = M[i, ..., 0]
        m[(g > STRUCTURE_STEP) & (m <= 127)] = STRUCTURE
