"""The default architecture: a small strided CNN, fully mappable to the Edge TPU.

Only int8-friendly ops: Conv2D / DepthwiseConv2D (BatchNorm folded at conversion), ReLU6,
Add (residuals), global MAX pooling, Dense, Softmax; static shapes. The float input is the
raw 0..255 pixel value; the 1/255 scaling is the model's first layer, so the uint8 TFLite
input has scale 1 and zero point 0 and agent.preprocess output goes in as is.

Why global max pooling: a defect may be anywhere and may be small. Each position of the
last feature map looks at a patch of the input (receptive field ~100 px at stride 16); the
max over positions asks "is there a defective patch anywhere?" - multiple-instance
learning inside the network, with per-image labels. The input stays large (default ~320 px)
so a 20-40 px defect on a 640 px frame keeps several pixels of extent.
"""

from __future__ import annotations

import keras
from keras import layers

# (filters, stride, residual repeats after the strided block)
DEFAULT_STAGES = ((24, 2, 0), (48, 2, 1), (64, 2, 1), (96, 2, 1))


def _bn_relu6(x, name):
    x = layers.BatchNormalization(momentum=0.8, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu6")(x)


def _dwsep(x, filters, stride, name):
    x = layers.DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False, name=f"{name}_dw")(x)
    x = _bn_relu6(x, f"{name}_dw")
    x = layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_pw")(x)
    return _bn_relu6(x, f"{name}_pw")


def build_model(height: int, width: int, channels: int, n_labels: int, *,
                stem: int = 16, stages=DEFAULT_STAGES, head: int = 64, dropout: float = 0.2,
                name: str = "edge_inspect_cnn") -> keras.Model:
    inp = keras.Input(shape=(height, width, channels), name="pixels")
    x = layers.Rescaling(1.0 / 255.0, name="rescale")(inp)
    x = layers.Conv2D(stem, 3, strides=2, padding="same", use_bias=False, name="stem")(x)
    x = _bn_relu6(x, "stem")
    for i, (filters, stride, repeats) in enumerate(stages):
        x = _dwsep(x, filters, stride, f"s{i}")
        for r in range(repeats):
            y = _dwsep(x, filters, 1, f"s{i}r{r}")
            x = layers.Add(name=f"s{i}r{r}_add")([x, y])
    # Linear 1x1 projection before the max: a max over ReLU6 outputs saturates at 6 for
    # every image and would carry no information.
    x = layers.Conv2D(head, 1, use_bias=False, name="head")(x)
    x = layers.BatchNormalization(momentum=0.8, name="head_bn")(x)
    # Max: "a defective patch anywhere"; mean: dense gradients so features learn quickly.
    x = layers.Concatenate(name="pool")([layers.GlobalMaxPooling2D(name="gmax")(x),
                                         layers.GlobalAveragePooling2D(name="gavg")(x)])
    if dropout:
        x = layers.Dropout(dropout, name="dropout")(x)
    out = layers.Dense(n_labels, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=name)
