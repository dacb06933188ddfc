"""Watching a training run: the weight average that gets validated, the best epoch kept,
and when to stop (convert.train's Keras callback)."""

from __future__ import annotations

import sys
import time

import numpy as np

from .threshold import roc_auc

# A validation loss gain under this is noise, not progress: without it a model that has
# already separated its validation set (loss ~0.01, falling by 1e-4 an epoch) trains on to
# the last epoch for nothing.
MIN_DELTA = 0.002
CONVERGED = 0.01
# Patience counts only from the first epoch whose validation AUC is above this. Learning
# from image labels alone (no boxes) first sits at chance while the net looks for the cells
# that tell the classes apart: on DeepPCB without its boxes (--epochs 30), validation AUC
# stayed at ~0.5 for 3 epochs before it rose to 0.92; patience 5 from epoch 1 had stopped
# the default run at chance.
LEARNING_AUC = 0.6


class WeightAverage:
    """Exponential moving average of a model's trainable weights, updated in the graph after
    every step. swap() exchanges the average and the live weights; a second swap() undoes it."""

    def __init__(self, variables, decay: float):
        import tensorflow as tf

        self.variables = list(variables)
        self.average = [tf.Variable(v, trainable=False) for v in self.variables]
        self.decay = float(decay)
        self._n = tf.Variable(0.0, trainable=False)
        self.update = tf.function(self._update, autograph=False)   # no Python control flow

    def _update(self):
        import tensorflow as tf

        self._n.assign_add(1.0)
        # bias-corrected start (tf.train.ExponentialMovingAverage's num_updates): the first
        # steps do not drag the random initial weights along
        d = tf.minimum(self.decay, (1.0 + self._n) / (10.0 + self._n))
        for a, v in zip(self.average, self.variables):
            a.assign(d * a + (1.0 - d) * v)

    def swap(self) -> None:
        for a, v in zip(self.average, self.variables):
            live = v.numpy()
            v.assign(a)
            a.assign(live)


def left_chance(best_auc: float) -> bool:
    """Whether a model's best validation AUC shows it has learnt anything at all."""
    return best_auc >= LEARNING_AUC


def out_of_patience(best_auc: float, epoch: int, best_epoch: int, patience: int) -> bool:
    """Early stopping: `patience` epochs without a better validation score, counted only once
    the model has left chance (best validation AUC >= LEARNING_AUC)."""
    return left_chance(best_auc) and epoch - best_epoch >= patience


class Progress:
    """Keeps a moving average of the weights, validates it after every epoch, prints a
    progress line, keeps the best average and stops early.

    The average (centred about a tenth of the steps back, its window at most about one
    epoch) is what gets validated and exported: averaged weights sit in a flatter minimum,
    which is what carries to parts and boards the training set never showed (weight
    averaging for domain generalisation, Cha et al., SWAD, 2021). On DeepPCB it raised test
    AUC 0.9952 -> 0.9958 over the raw weights of the same run, and validation AUC is
    steadier from epoch to epoch.

    "Best" is ranked by validation ROC AUC of the defect score, then loss: the threshold is
    chosen afterwards for the escape target, so what the model must get right is the
    ORDER of good and defect frames. The loss also measures calibration, which swings from
    epoch to epoch (a frame's score is the max of hundreds of cells; crop-trained models see
    more cells on a whole frame than in training) and picked poor epochs."""

    def __init__(self, epochs: int, verbose: bool, val_batches, good_idx: int, loss, patience: int,
                 ema_decay: float, keep_last: bool = False):
        import keras

        outer = self
        self.best, self.best_epoch, self.best_weights, self.epochs_run = -np.inf, 0, None, 0
        self.best_auc, self.best_loss = float("nan"), float("nan")
        self.separated = 0
        self.history: list[dict] = []

        infer = {}

        def validate(model):
            if "fn" not in infer:
                import tensorflow as tf
                infer["fn"] = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
            losses, weights, scores, truth = [], [], [], []
            for x, ys, ws in val_batches:
                out = infer["fn"](x)
                if isinstance(out, dict):
                    l, w = loss(ys["defect_map"], out["defect_map"]), ws["defect_map"]
                    probs, yy = out["probs"], ys["probs"]
                else:
                    l = keras.losses.sparse_categorical_crossentropy(ys, out)
                    w, probs, yy = ws, out, ys
                losses.append(np.asarray(l) * np.asarray(w))
                weights.append(np.asarray(w))
                scores.append(1.0 - np.asarray(probs)[:, good_idx])
                truth.append(np.asarray(yy) != good_idx)
            sc, tr = np.concatenate(scores), np.concatenate(truth)
            vl = float(np.concatenate(losses).sum() / max(np.concatenate(weights).sum(), 1e-9))
            return vl, roc_auc(sc, tr), float(np.mean((sc >= 0.5) == tr))

        class CB(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                outer.t0 = time.perf_counter()
                self.avg = WeightAverage(self.model.trainable_weights, ema_decay)

            def on_train_batch_end(self, batch, logs=None):
                self.avg.update()

            def on_epoch_begin(self, epoch, logs=None):
                outer.te = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                logs = logs if logs is not None else {}
                self.avg.swap()     # validate (and keep) the weight average
                vl, auc, acc = validate(self.model)
                logs.update(val_loss=vl, val_auc=auc, val_accuracy=acc)
                outer.history.append({"epoch": epoch + 1, "loss": logs.get("loss"), "val_loss": vl,
                                      "val_auc": auc})
                # AUC first; a loss gain under MIN_DELTA is noise (it ends training on data
                # the model has already separated, loss ~0.01 and falling 1e-4 an epoch)
                key = auc - 0.001 * vl
                # keep_last: the whole schedule, no selection (the last epoch is "best")
                if keep_last or key > outer.best + 0.001 * MIN_DELTA:
                    outer.best, outer.best_epoch = key, epoch + 1
                    outer.best_auc, outer.best_loss = auc, vl
                    outer.best_weights = self.model.get_weights()
                self.avg.swap()     # back to the live weights to train on
                if out_of_patience(outer.best_auc, epoch + 1, outer.best_epoch, patience):
                    self.model.stop_training = True
                # Validation perfectly ordered with margin (AUC 1, loss under CONVERGED) for
                # two epochs: more epochs cannot improve the order, only the time.
                outer.separated = outer.separated + 1 if auc >= 1.0 and vl < CONVERGED else 0
                if outer.separated >= 2:
                    self.model.stop_training = True
                outer.epochs_run = epoch + 1
                if verbose:
                    el = time.perf_counter() - outer.t0
                    eta = el / (epoch + 1) * (epochs - epoch - 1)
                    print(f"epoch {epoch + 1:>3}/{epochs}  loss {logs.get('loss', 0):.4f}  "
                          f"val_loss {vl:.4f}  val_auc {auc:.4f}  val_acc {acc:.3f}  "
                          f"{time.perf_counter() - outer.te:5.1f}s  (best @ {outer.best_epoch}: "
                          f"auc {outer.best_auc:.4f} loss {outer.best_loss:.4f}; elapsed "
                          f"{el:.0f}s, at most {eta:.0f}s left)", file=sys.stderr, flush=True)

            def on_train_end(self, logs=None):
                if outer.best_weights is not None:
                    self.model.set_weights(outer.best_weights)

        self.callback = CB()
