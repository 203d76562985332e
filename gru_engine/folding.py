"""A bundle's transforms as the compiled runtime runs them: folded into the weights where that is
exact arithmetic, the rest as steps of the compiled call (``gru_engine.kernels.transforms``).

Folding, when the model is packed:

- an affine input step x' = x * scale + offset that comes last, into the first layer (any
  recurrent layer, Bidirectional or Dense): kernel' = diag(scale) @ kernel, input bias' = bias +
  offset @ kernel;
- the first output inverse to apply, y = (y' - offset) / scale, into a last Dense with a linear
  activation: kernel' = kernel / scale, bias' = (bias - offset) / scale.

Both are exact in real arithmetic; in float32 they round differently from the step they replace,
within the parity tolerance (tests compare folded and unfolded models).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np

from .kernels import transforms as codes
from .spec import RECURRENT_FAMILIES, Layer, recurrent_configs, weight_shapes


@dataclasses.dataclass(frozen=True)
class Step:
    """One step as the kernel runs it (``gru_engine.kernels.transforms``): kind, parameter vectors, slot."""

    kind: int
    first: np.ndarray | None = None   # (W,) scale, or UNCENTER's feature indices
    second: np.ndarray | None = None  # (W,) offset
    slot: int = 0                     # CENTER / UNCENTER: which kept means


def _float32(values) -> np.ndarray:
    return np.asarray(values, np.float64).astype(np.float32)


def _fold_input(layer: Layer, scale, offset) -> Layer | None:
    """``layer`` reading x * scale + offset, as a layer reading x: scale (F,) folded into the rows of
    its kernel(s), offset @ kernel into its input bias. None for any other layer: Masking compares
    x' itself, and a padded Conv1D or pooling window would see its zero padding move."""
    if layer.kind not in ("dense", "bidirectional") and layer.kind not in RECURRENT_FAMILIES:
        return None
    config = copy.deepcopy(layer.config)
    for part in recurrent_configs(Layer(layer.kind, layer.name, config)) or [config]:
        part["use_bias"] = True
    folded = Layer(layer.kind, layer.name, config, dict(layer.weights))
    scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    for name, shape in weight_shapes(folded, scale.size).items():
        if not name.endswith("bias"):
            continue
        prefix = name[:-len("bias")]
        kernel = layer.weights[prefix + "kernel"].astype(np.float64)  # (F, N)
        bias = layer.weights[name].astype(np.float64) if name in layer.weights else np.zeros(shape)
        shift = offset @ kernel  # (N,), on the input side of the bias (row 0 of GRU's two rows)
        if bias.ndim == 2:
            bias[0] += shift
        else:
            bias += shift
        folded.weights[prefix + "kernel"] = _float32(kernel * scale[:, None])
        folded.weights[name] = _float32(bias)
    return folded


def _fold_output(layer: Layer, scale, offset) -> Layer | None:
    """A linear Dense followed by y = (y' - offset) / scale, as one Dense; None for any other layer."""
    if layer.kind != "dense" or layer.config["activation"] != "linear":
        return None
    scale, offset = np.asarray(scale, np.float64), np.asarray(offset, np.float64)
    bias = layer.weights["bias"].astype(np.float64) if layer.config["use_bias"] else 0.0
    weights = {"kernel": _float32(layer.weights["kernel"].astype(np.float64) / scale),
               "bias": _float32((bias - offset) / scale)}
    return Layer(layer.kind, layer.name, dict(layer.config, use_bias=True), weights)


def compile_steps(steps, layers: list[Layer], fold: bool = True):
    """The layers and the kernel's steps that run ``steps``: (layers, input steps, output steps in
    the order they apply).

    With ``fold``, an affine input step that comes last folds into the first layer's weights, and the
    first output inverse to apply, if affine, into a last linear Dense, when those layers allow it.
    """
    layers = list(layers)
    inputs, outputs, slots = [], [], 0
    for step in steps:
        kind = step["kind"]
        if kind == "affine":
            inputs.append(Step(codes.AFFINE, _float32(step["scale"]), _float32(step["offset"])))
            if step["output_scale"] is not None:
                outputs.append(Step(codes.INVERT_AFFINE, _float32(step["output_scale"]),
                                    _float32(step["output_offset"])))
        elif kind == "log":
            inputs.append(Step(codes.LOG))
            if step["invert_output"]:
                outputs.append(Step(codes.EXP))
        else:
            inputs.append(Step(codes.CENTER, slot=slots))
            if step["invert_output"]:
                outputs.append(Step(codes.UNCENTER, _float32(step["output_features"]), slot=slots))
            slots += 1
    outputs.reverse()
    if fold and inputs and inputs[-1].kind == codes.AFFINE:
        folded = _fold_input(layers[0], inputs[-1].first, inputs[-1].second)
        if folded is not None:
            layers[0] = folded
            inputs.pop()
    if fold and outputs and outputs[0].kind == codes.INVERT_AFFINE:
        folded = _fold_output(layers[-1], outputs[0].first, outputs[0].second)
        if folded is not None:
            layers[-1] = folded
            outputs.pop(0)
    return layers, inputs, outputs
