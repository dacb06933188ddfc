"""The default architecture: a small fully-convolutional CNN that scores every patch.

Only int8-friendly, Edge-TPU-mappable ops: Conv2D (BatchNorm folded at conversion), ReLU6,
global MAX pooling (REDUCE_MAX), FullyConnected, Softmax; static shapes. The float input is
the raw 0..255 pixel value and the 1/255 scaling is the model's first layer, so the uint8
TFLite input has scale 1 and zero point 0 and agent.preprocess output goes in as is.

Why this shape: a defect may be anywhere and may be small. The body maps the image to a
grid of cells (stride 16, each seeing ~90 px of input) and a 1x1 conv gives every cell a
logit per defect class: a *defect map*. The image's evidence for a class is the max over
cells ("a defective patch anywhere": multiple-instance learning inside the network), and a
fixed dense layer turns those maxima into class probabilities (P(defect) = sigmoid(max)
for one defect class).

The defect map is the training output (map_loss), so cells can be supervised directly:
every cell of a good image is good (always known), and where a defect image comes with
boxes, the cells under them are defective. That dense signal makes the net learn from a few
hundred images in minutes. Without boxes a defect image asks only for one confident cell.
The training model takes any input size, so boxed data can train on crops.
Plain 3x3 convs, not depthwise-separable ones: on a few hundred images they learn far
faster, and at this width they cost a few ms of int8 on a small CPU.
"""

from __future__ import annotations

import keras
import numpy as np
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
    body = [layers.Rescaling(1.0 / 255.0, name="rescale")]
    for i, (filters, stride) in enumerate(stages):
        body += [layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                               name=f"conv{i}"),
                 layers.BatchNormalization(momentum=0.9, name=f"conv{i}_bn"),
                 layers.ReLU(6.0, name=f"conv{i}_relu6")]
    body.append(layers.Conv2D(n_labels - 1, 1, name="defect_map"))     # logits per cell and class
    pool = layers.GlobalMaxPooling2D(name="max_cell")
    # Fixed, not learnt: P(defect k) = softmax([0, z_1..z_K])_k, so the verdict is exactly
    # the defect map's max (which map_loss trains) and more evidence never lowers it.
    head = _probs_head(n_labels)

    def apply(inp):
        x = inp
        for layer in body:
            x = layer(x)
        return x, head(pool(x))

    # The exported model has the static input shape; the training model takes any size, so
    # it can learn from crops (see convert.train) with the very same layers.
    inp = keras.Input(shape=(height, width, channels), name="pixels")
    model = keras.Model(inp, apply(inp)[1], name=name)
    any_inp = keras.Input(shape=(None, None, channels), name="pixels")
    dmap, probs = apply(any_inp)
    train_model = keras.Model(any_inp, {"probs": probs, "defect_map": dmap}, name=f"{name}_train")
    head.set_weights([_monotone_head(n_labels - 1), np.zeros(n_labels, "float32")])
    return train_model, model


def _probs_head(n_labels: int):
    return layers.Dense(n_labels, activation="softmax", name="probs", trainable=False)


# Lite0 blocks from this index on are fine-tuned; the ones before it stay frozen (ImageNet),
# so their output is computed once per image and view and cached (convert.finetune): a step
# then costs the upper blocks only, which keeps 1,000 images within minutes on 2 cores.
LITE0_TUNED_FROM = 14      # the last two blocks and the 1280-channel head conv are tuned


# 16 (convert.lite0.Lite0Layers: the stride-32 blocks dilated) was measured mixed over seeds
# on magnetic tiles at 1.66x the int8 invoke (benchmarks/README.md, 2026-12-07): not the default.
LITE0_OUTPUT_STRIDE = 32


def lite0_cut(tuned_from: int, output_stride: int = 32) -> tuple[int, int]:
    """(stride, channels) of the cached features: the output of block tuned_from - 1."""
    from .lite0 import BLOCKS
    stride = 2 * int(np.prod([b[1] for b in BLOCKS[:tuned_from]]))
    return min(stride, output_stride), BLOCKS[tuned_from - 1][4]


@keras.saving.register_keras_serializable("edge_inspect")
class Standardise(layers.Layer):
    """(x - mean) * inv_std per channel, both fixed weights set from the training features
    (convert.finetune.warm_start). Not keras.layers.Normalization: that one computes with
    constants captured when it was built or adapted, so weights set later with set_weights
    were silently ignored (it standardised nothing, and the warm-up's softmax, fitted on
    standardised features, met raw ones)."""

    def build(self, input_shape):
        d = int(input_shape[-1])
        self.mean = self.add_weight(name="mean", shape=(d,), initializer="zeros", trainable=False)
        self.inv_std = self.add_weight(name="inv_std", shape=(d,), initializer="ones", trainable=False)

    def call(self, x):
        return (x - self.mean) * self.inv_std


class Lite0Classifier:
    """The pretrained classifier: raw pixels -> (x - 127) / 128, gray repeated to RGB (so the
    bundle keeps raw uint8 input and agent.preprocess stays the one preprocessing) -> Lite0
    blocks 0..13 (frozen) -> blocks 14..15 and the head conv (tuned) -> 1280 features per
    stride-32 cell -> per channel the max AND the mean over cells -> each standardised, a
    dense layer each, logits summed -> softmax.

    Why max and mean: a small defect lives in a few cells (the max keeps its evidence, where
    a plain average dilutes it by the frame's area), shading or uneven texture spreads over
    all of them (the mean). Linear probes of frozen ImageNet Lite0 features on magnetic tiles
    (test AUC): stride-16 mean 0.911, max 0.903, both 0.957; head-conv mean 0.985, max 0.984,
    both 0.988. A max over per-cell logits (the scratch model's map head) instead learnt
    almost nothing from image labels (validation AUC 0.71 after 15 epochs): its gradient
    reaches one cell per image.

    model: the exported (static-shape) model; features: pixels -> cached block-13 features;
    train_model: (tiles, h, w, 192) features -> probs of the frame's most defective tile;
    tile_model: one tile's (h, w, 192) features -> its probs (the same layers);
    pooled: (h, w, 192) features -> the max-and-mean vector before standardisation (the
    warm-up fits the softmax on it in closed form, convert.finetune)."""

    def __init__(self, height: int, width: int, channels: int, n_labels: int, parts,
                 n_tiles: int = 1, good_idx: int = 0, tuned_from: int = LITE0_TUNED_FROM,
                 name: str = "edge_inspect_lite0"):
        import keras
        from keras import ops

        from .lite0 import STRIDE_END

        self.parts = parts
        self.gmp = layers.GlobalMaxPooling2D(name="max_cell")
        self.gap = layers.GlobalAveragePooling2D(name="mean_cell")
        # Two branches, each standardised (fixed, from the training features) and with its
        # own dense layer, summed as logits: the max of ReLU6 channels and their mean live
        # on scales 10x apart, and one int8 tensor holding both (a concatenation) gave the
        # means so few levels that int8 lost 2.5 points against float on a synthetic set.
        self.norm_max = Standardise(name="standardise_max")
        self.norm_mean = Standardise(name="standardise_mean")
        self.drop_max = layers.Dropout(0.2, name="dropout_max")
        self.drop_mean = layers.Dropout(0.2, name="dropout_mean")
        self.logit_max = layers.Dense(n_labels, name="probs")       # its bias: centre_head
        self.logit_mean = layers.Dense(n_labels, use_bias=False, name="logits_mean")
        self.sum = layers.Add(name="logits")
        self.softmax = layers.Softmax(name="softmax")
        channels_in = channels

        def lower(inp):
            x = layers.Rescaling(1.0 / 128.0, offset=-127.0 / 128.0, name="normalise")(inp)
            if channels_in == 1:
                x = layers.Concatenate(name="gray_to_rgb")([x, x, x])
            return parts.blocks(parts.stem(x), 0, tuned_from - 1)

        def cells(f):           # 1280 features per stride-32 cell
            x = parts.blocks(f, tuned_from, STRIDE_END[32])
            return layers.ReLU(6.0)(parts.L["head_bn"](parts.L["head_conv"](x)))

        def pooled(f):
            x = cells(f)
            return self.gmp(x), self.gap(x)

        def upper(f):
            g, a = pooled(f)
            return self.softmax(self.sum([self.logit_max(self.drop_max(self.norm_max(g))),
                                          self.logit_mean(self.drop_mean(self.norm_mean(a)))]))

        self._lower, self._cells, self._shape = lower, cells, (height, width, channels)
        inp = keras.Input((height, width, channels), name="pixels")
        self.model = keras.Model(inp, upper(lower(inp)), name=name)
        any_inp = keras.Input((None, None, channels), name="pixels")
        self.features = keras.Model(any_inp, lower(any_inp), name=f"{name}_features")
        self.tuned_from = tuned_from
        stride, C = lite0_cut(tuned_from, parts.output_stride)
        h, w = -(-height // stride), -(-width // stride)
        self.cells = (h, w)
        p_inp = keras.Input((h, w, C), name="features")
        self.pooled = keras.Model(p_inp, list(pooled(p_inp)), name=f"{name}_pooled")
        t_inp = keras.Input((h, w, C), name="features")
        self.tile_model = keras.Model(t_inp, upper(t_inp), name=f"{name}_tile")
        T = n_tiles
        f_inp = keras.Input((T, h, w, C), name="features")
        flat = layers.Lambda(lambda t: ops.reshape(t, (-1, h, w, C)), output_shape=(h, w, C),
                             name="tiles_in")(f_inp)
        p = upper(flat)

        def most_defective_tile(p):     # as agent.decide scores a frame: its worst tile
            p = ops.reshape(p, (-1, T, n_labels))
            pick = ops.one_hot(ops.argmax(1.0 - p[..., good_idx], axis=1), T)
            return ops.sum(p * ops.expand_dims(pick, -1), axis=1)

        out = p if T == 1 else layers.Lambda(most_defective_tile, output_shape=(n_labels,),
                                             name="max_tile")(p)
        self.train_model = keras.Model(f_inp, out, name=f"{name}_train")
        # BatchNorm stays in inference mode with ImageNet statistics: batches of 16 from one
        # line are too few and too alike to re-estimate them (the usual transfer-learning rule).
        for layer in parts.L.values():
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
        self.set_tuning(False)

    def fold_standardisation(self) -> None:
        """Move the standardisation into the dense layers (same function in float) before
        export: standardised max-pooled features have tails of tens of sd, and one int8
        scale over all 1280 of them cost 5 points of accuracy against float on magnetic
        tiles; the raw ReLU6 features they come from sit in [0, 6]."""
        Wx, b = self.logit_max.get_weights()
        Wa = self.logit_mean.get_weights()[0]
        mu_x, inv_x = self.norm_max.get_weights()
        mu_a, inv_a = self.norm_mean.get_weights()
        b = b - (mu_x * inv_x) @ Wx - (mu_a * inv_a) @ Wa      # the mean branch has no bias
        self.logit_max.set_weights([Wx * inv_x[:, None], b])
        self.logit_mean.set_weights([Wa * inv_a[:, None]])
        for norm in (self.norm_max, self.norm_mean):
            norm.set_weights([np.zeros_like(mu_x), np.ones_like(inv_x)])

    def map_model(self):
        """pixels -> (h, w) defect map in [0, 1], one value per stride-32 cell: the cell's
        share (cell_shares) of its likeliest defect class, as sigmoid(cells x share), "a
        frame made of cells like this one". Where, not whether: the verdict stays the
        model's. Exported as a second file and run for rejects only (the agent draws it)."""
        import keras
        from keras import layers, ops

        shares = self.cell_shares()
        n = float(self.cells[0] * self.cells[1])
        m = layers.Lambda(lambda t: ops.sigmoid(n * ops.max(t, axis=-1)),
                          name="defect_map")(shares.output)
        return keras.Model(shares.input, m, name="edge_inspect_lite0_map")

    def cell_shares(self):
        """pixels -> (h, w, K - 1): each cell's share of the frame's logit of defect class k
        against good, an exact split of the trained (and centred) head: the mean branch
        gives every cell its own features' share, the max branch gives each channel's term
        to the cell holding that channel's maximum (split among ties). Summed over cells,
        the shares are the frame's logits."""
        import keras
        from keras import layers, ops

        Wx, b = self.logit_max.get_weights()
        Wa = self.logit_mean.get_weights()[0]
        mu_x, inv_x = self.norm_max.get_weights()
        mu_a, inv_a = self.norm_mean.get_weights()
        sd_x, sd_a = 1.0 / inv_x, 1.0 / inv_a
        h, w = self.cells
        n = float(h * w)

        def against_good(W):            # (1280, K) -> (1280, K - 1): defect k minus good
            return W[:, 1:] - W[:, :1]

        inp = keras.Input(self._shape, name="pixels")
        x = self._cells(self._lower(inp))

        def max_owner(x):
            top = ops.max(x, axis=(1, 2), keepdims=True)
            own = ops.cast(ops.greater_equal(x, top), "float32")
            return own / ops.sum(own, axis=(1, 2), keepdims=True) * (x - mu_x)

        conv_x = layers.Conv2D(len(b) - 1, 1, use_bias=False, name="cell_share_max")
        conv_a = layers.Conv2D(len(b) - 1, 1, name="cell_share_mean")
        z = layers.Add()([conv_x(layers.Lambda(max_owner, name="max_owner")(x)),
                          conv_a(layers.Lambda(lambda t: t - mu_a, name="centre_mean")(x))])
        conv_x.set_weights([against_good(Wx / sd_x[:, None])[None, None].astype(np.float32)])
        conv_a.set_weights([(against_good(Wa / sd_a[:, None]) / n)[None, None].astype(np.float32),
                            ((b[1:] - b[0]) / n).astype(np.float32)])
        return keras.Model(inp, z, name="edge_inspect_lite0_cell_shares")

    def tuned_layers(self):
        from .lite0 import BLOCKS
        return self.parts.block_layers(self.tuned_from, len(BLOCKS) - 1) + [self.parts.L["head_conv"]]

    def set_tuning(self, backbone: bool) -> None:
        """Head only (the frozen warm-up), or the head and the upper blocks (fine-tuning)."""
        for layer in self.tuned_layers():
            if not isinstance(layer, layers.BatchNormalization):
                layer.trainable = backbone


def _monotone_head(k: int) -> np.ndarray:
    """(K, K+1) kernel: good logit 0, defect k's logit = its own evidence z_k. (A random,
    learnt head gave a coin-flip chance that more evidence *lowered* P(defect): the image
    loss then pushed the defect cell down along with the cell loss, and training sat at
    chance on data without boxes until the head flipped.)"""
    return np.concatenate([np.zeros((k, 1)), np.eye(k)], axis=1).astype("float32")


def centre_head(model: keras.Model, threshold: float) -> float:
    """Shift the fixed head so that a frame scoring `threshold` (1 - P(good)) scores 0.5;
    returns the bias. Every defect logit drops by logit(threshold), so the order of frames
    and the verdict at the shifted threshold do not change, but the operating point moves to
    where the uint8 output's 1/256 steps are finest (P near 0.5) instead of the few levels
    under 1.0 that a confident model's threshold otherwise sits in."""
    t = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    bias = float(np.log(t / (1.0 - t)))
    head = model.get_layer("probs")
    kernel, b = head.get_weights()
    b = b.copy()                # a learnt head (Lite0Classifier) keeps its own bias
    b[1:] -= bias
    head.set_weights([kernel, b])
    return bias


def centred_probs(probs: np.ndarray, threshold: float) -> np.ndarray:
    """What centre_head(model, threshold) makes of probabilities the model gave before it:
    every defect logit lowered by the same bias, i.e. defect probabilities scaled by
    exp(-bias) and renormalised (exact for softmax outputs). Out-of-fold scores from the
    fold models join the centred exported model's scores through this."""
    t = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    p = np.asarray(probs, np.float64).copy()
    p[..., 1:] *= (1.0 - t) / t
    return (p / p.sum(-1, keepdims=True)).astype(np.float32)


def map_loss(pos_weight: float = 10.0, max_weight: float = 1.0):
    """The training loss, all on the defect map (logits z, (B, h, w, K)).

    y_true per cell and class: 1 = defect, 0 = good, -1 = "somewhere in this image" (a defect
    image without boxes: only the image label is known). Three terms per image:
    * cell: sigmoid cross-entropy on every known cell, defect cells weighted up (they are a
      few % of cells);
    * hardest good cell: cross-entropy of the MAX over known-good cells against 0. The frame
      score is that max, so this trains exactly the statistic that false rejects come from
      (hard-negative mining), where the mean cell loss barely sees one bad cell in 400;
    * defect evidence: cross-entropy of the max over defect (or unknown) cells against 1, the
      multiple-instance term: a defect image needs one confident cell, not every box cell.
    The evidence for a defect thus only ever comes from where the defect can be, never from
    "whichever cell is highest" of a boxed image (that reinforced false alarms)."""
    from keras import ops

    def loss(y_true, z):
        y = ops.cast(y_true, z.dtype)
        known = ops.cast(y >= 0, z.dtype)
        t = ops.maximum(y, 0.0)
        w = known * (1.0 + (pos_weight - 1.0) * t)
        ce = ops.maximum(z, 0) - z * t + ops.log1p(ops.exp(-ops.abs(z)))
        cell = ops.sum(w * ce, axis=(1, 2, 3)) / ops.maximum(ops.sum(w, axis=(1, 2, 3)), 1.0)
        neg, pos = y == 0, y != 0
        z_neg = ops.max(ops.where(neg, z, -1e4), axis=(1, 2))
        z_pos = ops.max(ops.where(pos, z, -1e4), axis=(1, 2))
        l_neg = ops.where(ops.any(neg, axis=(1, 2)), ops.softplus(z_neg), 0.0)
        l_pos = ops.where(ops.any(pos, axis=(1, 2)), ops.softplus(-z_pos), 0.0)
        return cell + max_weight * ops.sum(l_neg + l_pos, axis=-1)

    return loss
