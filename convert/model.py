"""The default architecture: a small fully-convolutional CNN that scores every patch.

Only int8-friendly, Edge-TPU-mappable ops: Conv2D (BatchNorm folded at conversion), ReLU6,
global MAX pooling (REDUCE_MAX), FullyConnected, Softmax; static shapes. The float input is
the raw 0..255 pixel value and the 1/255 scaling is the model's first layer, so the uint8
TFLite input has scale 1 and zero point 0 and agent.preprocess output goes in as is.

Why this shape: a defect may be anywhere and may be small. The body maps the image to a
grid of cells (stride 16, each seeing ~90 px of input) and a 1x1 conv gives every cell a
logit per defect class: a *defect map*. The image's evidence for a class is the max over
cells ("a defective patch anywhere": multiple-instance learning inside the network), and a
dense layer turns those maxima into class probabilities.

The defect map is also a training output, so cells can be supervised directly: every cell
of a good image is good (always known), and where a defect image comes with boxes, the
cells under them are defective. That dense signal makes the net learn from a few hundred
images in minutes instead of waiting for the image-level max to find the defect alone.
Plain 3x3 convs, not depthwise-separable ones: on a few hundred images they learn far
faster, and at this width they cost a few ms of int8 on a small CPU.
"""

from __future__ import annotations

import keras
from keras import layers

# (filters, stride) of the body: stride 16 overall.
DEFAULT_STAGES = ((16, 2), (32, 2), (32, 1), (64, 2), (64, 1), (96, 2), (96, 1))
MAP_STRIDE = 16


def map_size(height: int, width: int) -> tuple[int, int]:
    """(rows, cols) of the defect map for an input of height x width ('same' padding)."""
    h, w = height, width
    for _, s in DEFAULT_STAGES:
        h, w = -(-h // s), -(-w // s)
    return h, w


def build_model(height: int, width: int, channels: int, n_labels: int, *,
                stages=DEFAULT_STAGES, name: str = "edge_inspect_fcn") -> tuple[keras.Model, keras.Model]:
    """(train_model, model): train_model outputs {"probs", "defect_map"}; model outputs
    only probs (B, n_labels) and is what gets exported. They share every layer."""
    inp = keras.Input(shape=(height, width, channels), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inp)
    for i, (filters, stride) in enumerate(stages):
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                          name=f"conv{i}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"conv{i}_bn")(x)
        x = layers.ReLU(6.0, name=f"conv{i}_relu6")(x)
    dmap = layers.Conv2D(n_labels - 1, 1, name="defect_map")(x)     # logits per cell and class
    z = layers.GlobalMaxPooling2D(name="max_cell")(dmap)
    probs = layers.Dense(n_labels, activation="softmax", name="probs",
                         kernel_initializer=_monotone_head)(z)
    model = keras.Model(inp, probs, name=name)
    train_model = keras.Model(inp, {"probs": probs, "defect_map": dmap}, name=f"{name}_train")
    return train_model, model


def _monotone_head(shape, dtype=None):
    """(K, K+1) kernel: good logit 0, defect k's logit = its own evidence z_k. A random init
    gives a coin-flip chance that more evidence *lowers* P(defect); then the image loss
    pushes the defect cell down while the cell loss pushes every good cell down, the two
    agree, and training sits at chance until the head flips (seen on data without boxes)."""
    from keras import ops
    k = shape[0]
    return ops.concatenate([ops.zeros((k, 1), dtype=dtype), ops.eye(k, dtype=dtype)], axis=1)


def map_loss(pos_weight: float = 10.0):
    """Per-image cell loss on the defect map: sigmoid cross-entropy, positive cells weighted
    up (they are a few % of cells). y_true: (B, h, w, K) in {0, 1}."""
    from keras import ops

    def loss(y_true, y_pred):
        y_true = ops.cast(y_true, y_pred.dtype)
        w = 1.0 + (pos_weight - 1.0) * y_true
        ce = ops.maximum(y_pred, 0) - y_pred * y_true + ops.log1p(ops.exp(-ops.abs(y_pred)))
        return ops.sum(w * ce, axis=(1, 2, 3)) / ops.sum(w, axis=(1, 2, 3))

    return loss
