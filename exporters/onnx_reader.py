"""ONNX graph of GRU, LSTM and RNN nodes -> ModelSpec (``read_onnx``) -> self-checking bundle (``import_onnx``).

LSTM and RNN nodes are read by ``onnx_lstm`` (its docstring has their mapping); this module's
description of GRU nodes' glue, initial states and outputs holds for them too (an LSTM's initial_c
and Y_c as its initial_h and Y_h).

So that ONNX models from other frameworks run on the engine (PyTorch exports nn.GRU as one ONNX
GRU node per layer, gates already in z, r, h order, linear_before_reset=1). The graph is
interpreted node by node: every tensor is known as a constant, a shape vector, a zero tensor, a
state input, GRU outputs not yet turned into a layer, or "the model input after these layers, with
these axes"; each node extends that chain of layers or is refused with an error naming it.

Accepted:
- GRU, direction forward, reverse or bidirectional, linear_before_reset 0 or 1, activations
  Sigmoid, Tanh, Relu, HardSigmoid(alpha=1/6, beta=0.5) (Keras 3 hard_sigmoid) and
  Affine(alpha=1, beta=0) (linear); as in onnxruntime, activation_alpha/beta values are consumed
  only by the functions that take them.
- initial_h absent, all zeros (a constant, or ConstantOfShape/Expand of zeros sized from the
  input's Shape, as PyTorch exports it), or fed by graph inputs (see below).
- Glue: Transpose, Squeeze, Unsqueeze, Reshape, Identity, Cast; Gather/Slice to pick a direction,
  reverse time (step -1) or take the last time step; Concat/Add/Mul (and Mul 0.5 or Div 2 after the
  Add) of the two directions of a bidirectional GRU: Keras merge modes concat, sum, mul, ave.
- Dense: MatMul, or Gemm on 2-D data, with a constant weight; Add of a constant bias; then Relu,
  Sigmoid, Tanh or Softmax over the feature axis.
- Constants: initializers, Constant nodes, and any node whose inputs are all constant (folded).

Mapping, the inverse of ``onnx_writer``'s: kernel = W[d].T (I, 3H), recurrent_kernel = R[d].T
(H, 3H); linear_before_reset=1 is reset_after=True with bias = [Wb, Rb] (2, 3H);
linear_before_reset=0 is reset_after=False with bias = Wb + Rb (3H,): every bias term is then
added before its activation. A GRU reading its input from the end (a reverse direction, or a
forward GRU over a time-reversed input) is Keras go_backwards=True.

A graph input feeding initial_h (directly as (directions, batch, units), sliced along its first
axis, or unsqueezed from (batch, units)) becomes the engine's ``initial_state``: pass
``Model.predict(x, initial_state=[...])`` one (batch, units) array per GRU direction in layer
order, the slice of initial_h for that direction. Left out, it is zero, which is also what the
bundle's self-check feeds onnxruntime.

The first graph input (not an initializer) is the model input, float32 (batch, time, features)
with a fixed feature count. The graph outputs must be what a Keras model of these layers returns:
the main output(s), (batch, time, D) or (batch, D), then optionally the final states of the last
layer's directions.

Refused (UnsupportedModelError naming the node or tensor): other operators, among them the Loop
that tf2onnx writes for a Keras GRU (import the native export instead); GRU clip,
sequence_lens or layout=1 (onnxruntime cannot run it); a non-zero constant initial_h; other
activations or alpha/beta; a time-major or non-float32 model input; outputs that are not the
chain's. Malformed files (unreadable, failing onnx.checker, a GRU weight that is not a constant or
has the wrong shape) raise BundleError.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from gru_engine import bundle
from gru_engine.errors import BundleError, UnsupportedModelError
from gru_engine.spec import Layer, ModelSpec, recurrent_configs, recurrent_kind, sample_input, validate

from . import onnx_conv
from .keras_reader import SELF_CHECK_BATCH, SELF_CHECK_STEPS
from . import onnx_lstm
from .onnx_writer import RECURRENT_ACTIVATIONS

# Axis labels: the model's batch and time, a feature axis, the GRU's direction axis, a size-1 axis.
BATCH, TIME, FEATURE, DIRECTION, ONE = "batch", "time", "features", "direction", "1"
SUPPORTED = ("GRU, LSTM and RNN nodes with Transpose/Squeeze/Unsqueeze/Reshape/Gather/Slice/Concat glue, merges of the two "
             "directions (Concat/Add/Mul), MatMul/Gemm + Add + Relu/Sigmoid/Tanh/Softmax dense layers, "
             "Conv (+ Relu/Sigmoid/Tanh), MaxPool, AveragePool, GlobalMaxPool, GlobalAveragePool, "
             "BatchNormalization")
RECURRENT_OPS = ("GRU", "LSTM", "RNN")  # never folded, even with every input constant
GRU_ATTRIBUTES = {"activation_alpha", "activation_beta", "activations", "clip", "direction", "hidden_size",
                  "layout", "linear_before_reset"}
# ONNX activation (lower case) -> (Keras name, alpha, beta) of the ones the engine computes exactly.
ACTIVATIONS = {onnx_name.lower(): (keras_name, alpha, beta)
               for keras_name, (onnx_name, alpha, beta) in RECURRENT_ACTIVATIONS.items()}
# A Slice bound at or beyond these reaches the end of the axis (PyTorch and numpy both use them).
SLICE_END = 2**31 - 1
SLICE_BEFORE_START = -(2**31)
MAX_FOLDED_ELEMENTS = 50_000_000
# With an update gate z outside [0, 1] (recurrent activation tanh, relu or linear), h' = z h + (1 - z) hh
# can grow the carry, and float32 rounding grows with it: onnxruntime and the engine order their sums
# differently, so such models are self-checked over fewer steps, where both still agree.
CONTRACTING_GATES = ("sigmoid", "hard_sigmoid")
EXPANDING_SELF_CHECK_STEPS = 4


@dataclasses.dataclass(eq=False)
class _Const:
    array: np.ndarray


@dataclasses.dataclass(eq=False)
class _Shape:
    """An int64 vector of sizes: ints, or BATCH / TIME for the model's dynamic sizes."""

    dims: tuple
    scalar: bool = False


@dataclasses.dataclass(eq=False)
class _Zeros:
    """An all-zero float tensor (its shape is left to onnxruntime)."""


@dataclasses.dataclass(eq=False)
class _StateInput:
    """Graph inputs on their way to initial_h (the engine's initial_state)."""

    axes: tuple
    directions: int    # size of the DIRECTION axis


@dataclasses.dataclass(eq=False)
class _Chain:
    """The model input after ``layers``; ``flipped``: reversed in time relative to their output."""

    layers: tuple
    axes: tuple
    width: int         # size of the FEATURE axis
    flipped: bool = False
    open: str = ""     # the last layer still absorbs: "kernel" (a bias), "bias" (an activation), "sum" (-> ave)
    origin: tuple = ()  # GRU directions of the last layer, when it is recurrent


@dataclasses.dataclass(eq=False)
class _Direction:
    name: str          # the GRU node's name, for the layer
    key: tuple         # (GRU node index, direction index)
    config: dict       # the GRU config; return_sequences is set when it becomes a layer
    weights: dict
    source: _Chain     # what the GRU reads
    flipped: bool      # its Y runs opposite to its processing order (a reverse ONNX direction)
    kind: str = "gru"  # the layer kind it becomes: gru, lstm or simple_rnn


@dataclasses.dataclass(eq=False)
class _Recurrent:
    """Y (sequence) or Y_h of a GRU node, before the directions become a layer."""

    directions: tuple
    axes: tuple        # DIRECTION stays while the directions are still stacked
    sequence: bool
    carry: int = 0     # which final carry a non-sequence value is: 0 h (Y_h), 1 an LSTM's c (Y_c)


def _describe(value) -> str:
    if isinstance(value, _Const):
        return f"a constant of shape {value.array.shape}"
    if isinstance(value, (_Chain, _Recurrent, _StateInput)):
        return f"a tensor with axes ({', '.join(value.axes)})"
    return {_Shape: "a shape vector", _Zeros: "a zero tensor"}.get(type(value), "an unknown value")


class _Reader:
    def __init__(self, model, path):
        self.model, self.path = model, path
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
        self.values: dict[str, object] = {}
        self.node = None  # the node being read, named in errors
        self.node_index = 0

    # ----- errors and operands -----
    def where(self) -> str:
        node = self.node
        if node is None:
            return f"{self.path}: the graph"
        return f"{self.path}: node '{node.name or node.output[0]}' ({node.op_type})"

    def fail(self, message: str):
        raise UnsupportedModelError(f"{self.where()}: {message}")

    def malformed(self, message: str):
        raise BundleError(f"{self.where()}: {message}")

    def constant(self, value, what: str) -> np.ndarray:
        if not isinstance(value, _Const):
            self.malformed(f"{what} must be a constant (an initializer or Constant), got {_describe(value)}")
        return value.array

    def ints(self, value, what: str) -> list[int]:
        array = self.constant(value, what)
        if array.dtype.kind not in "iu":
            self.malformed(f"{what} must be integers, got {array.dtype}")
        return [int(v) for v in array.reshape(-1)]

    def chain(self, value) -> _Chain:
        """The value as model data, turning a single GRU direction into a layer."""
        if isinstance(value, _Chain):
            return value
        if isinstance(value, _Recurrent):
            if len(value.directions) != 1:
                self.fail("it uses both directions of a bidirectional GRU without merging them; take one "
                          "(Gather/Slice on the direction axis) or merge them (Concat, Add, Mul)")
            direction = value.directions[0]
            if value.carry:
                self.fail("it uses an LSTM's final cell state Y_c as data; a Keras model only returns it as a state")
            config = dict(direction.config, return_sequences=value.sequence)
            layer = Layer(direction.kind, direction.name, config, direction.weights)
            return _Chain(direction.source.layers + (layer,), tuple(ONE if a == DIRECTION else a for a in value.axes),
                          config["units"], direction.flipped and value.sequence, origin=(direction.key,))
        self.fail(f"expects the model's data, got {_describe(value)}")

    def layer_name(self) -> str:
        return self.node.name or f"{self.node.op_type.lower()}_{self.node_index}"

    def axis(self, value, axis: int, rank: int | None = None) -> int:
        rank = len(value.axes) if rank is None else rank
        if not -rank <= axis < rank:
            self.malformed(f"axis {axis} is out of range for rank {rank}")
        return axis % rank

    def attribute_or_input(self, inputs, position: int, name: str, attributes):
        """Opset 13 moved Squeeze/Unsqueeze/Slice parameters from attributes to inputs."""
        if len(inputs) > position and inputs[position] is not None:
            return self.ints(inputs[position], name)
        return attributes.get(name)

    # ----- the graph -----
    def run(self):
        from onnx import helper, numpy_helper

        graph = self.model.graph
        for tensor in graph.initializer:
            self.values[tensor.name] = _Const(numpy_helper.to_array(tensor))
        inputs = [value for value in graph.input if value.name not in self.values]
        if not inputs:
            raise BundleError(f"{self.path}: the graph has no input")
        self.main_input = inputs[0]
        self.features = self._main_input_features(inputs[0])
        # A graph exported with a fixed batch or time has those sizes baked into its Reshape targets.
        dims = inputs[0].type.tensor_type.shape.dim
        self.batch_size = dims[0].dim_value or BATCH
        self.time_size = dims[1].dim_value or TIME
        self.values[inputs[0].name] = _Chain((), (BATCH, TIME, FEATURE), self.features)
        for state in inputs[1:]:
            self.values[state.name] = self._state_input(state)
        needed = self._needed_nodes(graph)
        for index in sorted(needed):
            if graph.node[index].op_type in ("Loop", "Scan", "If"):
                self.node = graph.node[index]
                self.fail("the graph runs its recurrence as a loop (as tf2onnx writes Keras GRUs); gru-engine "
                          "imports graphs of native ONNX GRU nodes, e.g. from gru-engine export --onnx-method native")
        for index, node in enumerate(graph.node):
            if index not in needed:
                continue
            self.node, self.node_index = node, index
            attributes = {a.name: _text(helper.get_attribute_value(a)) for a in node.attribute}
            operands = []
            for name in node.input:
                if name and name not in self.values:
                    raise BundleError(f"{self.path}: node '{node.name}' reads '{name}', which no node, input or "
                                      "initializer defines")
                operands.append(self.values[name] if name else None)
            try:
                outputs = self._evaluate(node, operands, attributes)
            except (UnsupportedModelError, BundleError):
                raise
            except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:  # odd attributes or shapes
                self.malformed(f"cannot read this node ({type(exc).__name__}: {exc})")
            for name, value in zip(node.output, outputs):
                if name:
                    self.values[name] = value

    def _main_input_features(self, value) -> int:
        tensor = value.type.tensor_type
        if tensor.elem_type != 1:
            raise UnsupportedModelError(f"{self.path}: input '{value.name}' is not float32 (ONNX element type "
                                        f"{tensor.elem_type}); gru-engine runs float32 models")
        dims = tensor.shape.dim
        if len(dims) != 3 or not dims[2].HasField("dim_value"):
            raise UnsupportedModelError(f"{self.path}: input '{value.name}' must be (batch, time, features) with a "
                                        "fixed feature count")
        return int(dims[2].dim_value)

    def _state_input(self, value) -> _StateInput:
        dims = value.type.tensor_type.shape.dim
        if len(dims) == 3 and dims[0].HasField("dim_value"):
            return _StateInput((DIRECTION, BATCH, FEATURE), int(dims[0].dim_value))
        if len(dims) == 2:
            return _StateInput((BATCH, FEATURE), 1)
        raise UnsupportedModelError(f"{self.path}: input '{value.name}' is neither the model input nor an initial "
                                    "state (directions, batch, units) or (batch, units)")

    def _needed_nodes(self, graph) -> set[int]:
        """Nodes the graph outputs depend on; others are never interpreted."""
        producers = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
        needed, pending = set(), [output.name for output in graph.output]
        while pending:
            index = producers.get(pending.pop())
            if index is not None and index not in needed:
                needed.add(index)
                pending += [name for name in graph.node[index].input if name]
        return needed

    def _evaluate(self, node, operands, attributes) -> list:
        if node.domain not in ("", "ai.onnx"):
            self.fail(f"custom operator domain '{node.domain}'")
        if node.op_type not in RECURRENT_OPS and all(isinstance(value, (_Const, type(None))) for value in operands):
            return self._fold(node, operands)
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            self.fail(f"this operator is not supported; gru-engine imports {SUPPORTED}")
        result = handler(operands, attributes)
        return result if isinstance(result, list) else [result]

    def _fold(self, node, operands) -> list:
        """A node of constants is a constant: run it with ONNX's reference evaluator."""
        from onnx.reference import ReferenceEvaluator

        if node.op_type.startswith("Random") or sum(o.array.size for o in operands if o) > MAX_FOLDED_ELEMENTS:
            self.fail("only deterministic, moderately sized constant expressions are folded")
        feeds = {name: value.array for name, value in zip(node.input, operands) if name}
        try:
            results = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:  # the reference evaluator raises many types for bad nodes
            self.malformed(f"cannot evaluate this constant expression ({type(exc).__name__}: {exc})")
        return [_Const(np.asarray(result)) for result in results]

    # ----- layout ops -----
    def _op_Identity(self, operands, attributes):
        return operands[0]

    def _op_Cast(self, operands, attributes):
        value = operands[0]
        if isinstance(value, _Shape) or (isinstance(value, (_Chain, _Recurrent, _Zeros)) and attributes.get("to") == 1):
            return value
        self.fail(f"casts {_describe(value)} to ONNX type {attributes.get('to')}")

    def _relabel(self, value, axes):
        if isinstance(value, _Zeros):
            return value
        return dataclasses.replace(value, axes=tuple(axes))

    def _op_Transpose(self, operands, attributes):
        value = operands[0]
        if not isinstance(value, (_Chain, _Recurrent, _StateInput, _Zeros)):
            self.fail(f"transposes {_describe(value)}")
        if isinstance(value, _Zeros):
            return value
        perm = attributes.get("perm", list(range(len(value.axes)))[::-1])
        if sorted(perm) != list(range(len(value.axes))):
            self.malformed(f"perm {perm} is not a permutation of {len(value.axes)} axes")
        return self._relabel(value, [value.axes[p] for p in perm])

    def _op_Squeeze(self, operands, attributes):
        value = operands[0]
        axes = self.attribute_or_input(operands, 1, "axes", attributes)
        if isinstance(value, _Zeros):
            return value
        if isinstance(value, _Shape) and len(value.dims) == 1 and axes in ([0], [-1]):
            return _Shape(value.dims, scalar=True)
        if not isinstance(value, (_Chain, _Recurrent)):
            self.fail(f"squeezes {_describe(value)}")
        if axes is None:
            self.fail("Squeeze without axes depends on the runtime batch size; give the axes")
        drop = {self.axis(value, axis) for axis in axes}
        for axis in drop:
            single_direction = value.axes[axis] == DIRECTION and len(value.directions) == 1
            if value.axes[axis] != ONE and not single_direction:
                self.fail(f"squeezes the {value.axes[axis]} axis")
        return self._relabel(value, [a for i, a in enumerate(value.axes) if i not in drop])

    def _op_Unsqueeze(self, operands, attributes):
        value = operands[0]
        axes = self.attribute_or_input(operands, 1, "axes", attributes)
        if isinstance(value, _Zeros):
            return value
        if isinstance(value, _Shape) and value.scalar and axes in ([0], [-1]):
            return _Shape(value.dims)
        if isinstance(value, _StateInput) and value.axes == (BATCH, FEATURE) and axes in ([0], [-3]):
            return _StateInput((DIRECTION, BATCH, FEATURE), 1)
        if not isinstance(value, (_Chain, _Recurrent)) or axes is None:
            self.fail(f"unsqueezes {_describe(value)}")
        rank = len(value.axes) + len(axes)
        inserted = {self.axis(value, axis, rank) for axis in axes}
        remaining = iter(value.axes)
        return self._relabel(value, [ONE if i in inserted else next(remaining) for i in range(rank)])

    def _sizes(self, value) -> list:
        """Each axis's size: an int, or BATCH / TIME."""
        sizes = {BATCH: self.batch_size, TIME: self.time_size, ONE: 1}
        if isinstance(value, _Recurrent):
            sizes[DIRECTION] = len(value.directions)
            sizes[FEATURE] = value.directions[0].config["units"]
        elif isinstance(value, _StateInput):
            sizes[DIRECTION] = value.directions
            sizes[FEATURE] = None
        else:
            sizes[FEATURE] = value.width
        return [sizes[axis] for axis in value.axes]

    def _op_Shape(self, operands, attributes):
        value = operands[0]
        if not isinstance(value, (_Chain, _Recurrent)):
            self.fail(f"takes the shape of {_describe(value)}")
        sizes = self._sizes(value)
        return _Shape(tuple(sizes[attributes.get("start", 0):attributes.get("end", len(sizes))]))

    def _op_Reshape(self, operands, attributes):
        """Only reshapes that add or drop size-1 axes, or join (direction, features) = Concat of the directions."""
        value, target = operands[0], operands[1]
        if isinstance(value, _Zeros):
            return value
        if not isinstance(value, (_Chain, _Recurrent)):
            self.fail(f"reshapes {_describe(value)}")
        if isinstance(target, _Shape):
            target = list(target.dims)
        else:
            target = self.ints(target, "the target shape")
        sizes = self._sizes(value)
        target = [sizes[i] if size == 0 and not attributes.get("allowzero") and i < len(sizes) else size
                  for i, size in enumerate(target)]
        axes = list(value.axes)
        if isinstance(value, _Recurrent) and DIRECTION in axes and axes.index(DIRECTION) + 1 < len(axes) \
                and axes[axes.index(DIRECTION) + 1] == FEATURE and len(value.directions) == 2:
            # (..., direction, features) -> (..., direction * features), as PyTorch writes a bidirectional output
            joined = axes.index(DIRECTION)
            units = value.directions[0].config["units"]
            merged_sizes = sizes[:joined] + [2 * units] + sizes[joined + 2:]
            merged_axes = axes[:joined] + [FEATURE] + axes[joined + 2:]
            labels = _match_reshape(merged_axes, merged_sizes, target)
            if labels is not None:
                forward, backward = self._split_pair(value)
                chain = self._merge(forward, backward, "concat")
                return dataclasses.replace(chain, axes=tuple(labels))
        labels = _match_reshape(axes, sizes, target)
        if labels is None:
            self.fail(f"reshapes axes ({', '.join(axes)}) to {target}; only size-1 axes may be added or removed")
        return self._relabel(value, labels)

    # ----- picking parts -----
    def _split_pair(self, value: _Recurrent) -> tuple[_Recurrent, _Recurrent]:
        axes = tuple(a for a in value.axes if a != DIRECTION)
        return tuple(_Recurrent((direction,), axes, value.sequence) for direction in value.directions)

    def _pick_direction(self, value, index: int, keep: bool):
        count = len(value.directions) if isinstance(value, _Recurrent) else value.directions
        if not -count <= index < count:
            self.malformed(f"direction index {index} is out of range for {count} directions")
        axes = value.axes if keep else tuple(a for a in value.axes if a != DIRECTION)
        if isinstance(value, _StateInput):
            if not keep:
                self.fail("initial states must keep their direction axis")
            return _StateInput(axes, 1)
        return dataclasses.replace(value, directions=(value.directions[index],), axes=axes)

    def _last_step(self, value, position: int, keep: bool):
        """The last step a GRU processed: Keras return_sequences=False (equal to the GRU's final state)."""
        axes = tuple((ONE if keep else None) if a == TIME else a for a in value.axes)
        axes = tuple(a for a in axes if a is not None)
        if isinstance(value, _Recurrent) and len(value.directions) == 1:
            if position != (0 if value.directions[0].flipped else -1):
                self.fail("takes a time step other than the last one the GRU processed")
            return _Recurrent(value.directions, axes, sequence=False)
        chain = self.chain(value)
        recurrent = [i for i, layer in enumerate(chain.layers) if layer.kind != "dense"]
        if position != (0 if chain.flipped else -1) or not recurrent \
                or chain.layers[recurrent[-1]].kind == "bidirectional":
            self.fail("takes a time step other than the last one a (unidirectional) GRU processed")
        index = recurrent[-1]
        layer = chain.layers[index]
        layer = dataclasses.replace(layer, config=dict(layer.config, return_sequences=False))
        return dataclasses.replace(chain, layers=chain.layers[:index] + (layer,) + chain.layers[index + 1:],
                                   axes=axes, flipped=False)

    def _reverse_time(self, value):
        if isinstance(value, _Recurrent) and value.sequence:
            flipped = tuple(dataclasses.replace(d, flipped=not d.flipped) for d in value.directions)
            return dataclasses.replace(value, directions=flipped)
        chain = self.chain(value)
        return dataclasses.replace(chain, flipped=not chain.flipped)

    def _op_Gather(self, operands, attributes):
        value = operands[0]
        indices = self.constant(operands[1], "the indices")
        if isinstance(value, _Zeros):
            return value
        if isinstance(value, _Shape):
            picked = tuple(value.dims[int(i)] for i in indices.reshape(-1))
            return _Shape(picked, scalar=indices.ndim == 0)
        if not isinstance(value, (_Chain, _Recurrent, _StateInput)) or indices.size != 1 or indices.ndim > 1:
            self.fail(f"gathers {_describe(value)} with indices of shape {indices.shape}")
        axis = self.axis(value, attributes.get("axis", 0))
        keep, index = indices.ndim == 1, int(indices.reshape(-1)[0])
        if value.axes[axis] == DIRECTION:
            return self._pick_direction(value, index, keep)
        if value.axes[axis] == TIME:
            return self._last_step(value, index, keep)
        self.fail(f"gathers along the {value.axes[axis]} axis")

    def _op_Slice(self, operands, attributes):
        value = operands[0]
        if isinstance(value, _Zeros):
            return value
        if not isinstance(value, (_Chain, _Recurrent, _StateInput)):
            self.fail(f"slices {_describe(value)}")
        starts = self.attribute_or_input(operands, 1, "starts", attributes)
        ends = self.attribute_or_input(operands, 2, "ends", attributes)
        axes = self.attribute_or_input(operands, 3, "axes", attributes) or list(range(len(starts)))
        steps = self.attribute_or_input(operands, 4, "steps", attributes) or [1] * len(starts)
        if not len(starts) == len(ends) == len(axes) == len(steps):
            self.malformed("starts, ends, axes and steps have different lengths")
        for start, end, axis, step in zip(starts, ends, axes, steps):
            label = value.axes[self.axis(value, axis)]
            if start == 0 and end >= SLICE_END and step == 1:
                continue  # the whole axis
            if label == TIME and step == -1 and (start == -1 or start >= SLICE_END) and end <= SLICE_BEFORE_START:
                value = self._reverse_time(value)
            elif label == TIME and start == -1 and end >= SLICE_END and step == 1:
                value = self._last_step(value, -1, keep=True)
            elif label == DIRECTION and step == 1 and end == start + 1 and start >= 0:
                value = self._pick_direction(value, start, keep=True)
            elif label == DIRECTION and isinstance(value, _StateInput) and step == 1 and 0 <= start < end:
                value = _StateInput(value.axes, min(end, value.directions) - start)
            else:
                self.fail(f"slices [{start}:{end}:{step}] of the {label} axis")
        return value

    # ----- merges and arithmetic -----
    def _merge(self, forward, backward, mode) -> _Chain:
        """Two GRU directions over the same input -> a Bidirectional layer (merge_mode None, concat, ...)."""
        pair = (forward, backward)
        if not all(isinstance(v, _Recurrent) and len(v.directions) == 1 for v in pair):
            self.fail(f"combines {_describe(forward)} and {_describe(backward)}; only two GRU directions merge")
        f, b = forward.directions[0], backward.directions[0]
        sequence = forward.sequence
        if backward.sequence != sequence or forward.axes != backward.axes or f.source is not b.source \
                or f.kind != b.kind or forward.carry or backward.carry:
            self.fail("merges GRU outputs of different kinds, layouts or inputs")
        if f.config["go_backwards"] or not b.config["go_backwards"]:
            self.fail("a Bidirectional merge takes the forward direction first and the backward one second")
        if sequence and f.flipped == b.flipped:
            self.fail("the two directions' sequences are not aligned in time")
        if mode not in ("concat", None) and f.config["units"] != b.config["units"]:
            self.fail(f"merge '{mode}' needs the same units in both directions")
        configs = {"forward": dict(f.config, return_sequences=sequence),
                   "backward": dict(b.config, return_sequences=sequence)}
        weights = {f"{side}.{name}": array for side, d in (("forward", f), ("backward", b))
                   for name, array in d.weights.items()}
        wrapped = {"layer": f.kind} if f.kind != "gru" else {}  # as the Keras reader writes it
        layer = Layer("bidirectional", f.name, {"merge_mode": mode, **wrapped, **configs}, weights)
        width = f.config["units"] + (b.config["units"] if mode == "concat" else 0)
        return _Chain(f.source.layers + (layer,), forward.axes, width, f.flipped and sequence,
                      open="sum" if mode == "sum" else "", origin=(f.key, b.key))

    def _op_Concat(self, operands, attributes):
        if all(isinstance(v, _Shape) or (isinstance(v, _Const) and v.array.dtype.kind == "i") for v in operands):
            dims = sum((v.dims if isinstance(v, _Shape) else tuple(int(d) for d in v.array.reshape(-1))
                        for v in operands), ())
            return _Shape(dims)
        if all(isinstance(v, _Zeros) for v in operands):
            return operands[0]
        if all(isinstance(v, _StateInput) and v.axes[0] == DIRECTION for v in operands) \
                and attributes.get("axis") in (0, -3):
            return _StateInput(operands[0].axes, sum(v.directions for v in operands))
        if len(operands) == 2 and all(isinstance(v, _Recurrent) for v in operands) \
                and operands[0].axes[self.axis(operands[0], attributes.get("axis", 0))] == FEATURE:
            return self._merge(operands[0], operands[1], "concat")
        self.fail("only the two directions of a GRU (along the feature axis) or shape vectors are concatenated")

    def _op_Add(self, operands, attributes):
        if all(isinstance(v, _Recurrent) for v in operands):
            return self._merge(operands[0], operands[1], "sum")
        data, bias = operands if isinstance(operands[1], _Const) else operands[::-1]
        if not isinstance(bias, _Const):
            self.fail("adds two tensors that are not the two directions of a GRU")
        chain = self.chain(data)
        if chain.open != "kernel" or chain.axes[-1] != FEATURE:
            self.fail("adds a constant that is not the bias of a MatMul over the feature axis")
        array = bias.array  # broadcast along the feature axis only: (), (U,), (1, U), (1, 1, U), ...
        along_features = array.ndim <= len(chain.axes) and all(size == 1 for size in array.shape[:-1]) \
            and array.size in (1, chain.width)
        if array.dtype != np.float32 or not along_features:
            self.fail(f"adds a constant of shape {array.shape} {array.dtype}; a Dense bias is ({chain.width},) float32")
        layer = chain.layers[-1]
        weights = dict(layer.weights, bias=np.broadcast_to(array.reshape(-1), (chain.width,)).astype(np.float32))
        layer = dataclasses.replace(layer, config=dict(layer.config, use_bias=True), weights=weights)
        return dataclasses.replace(chain, layers=chain.layers[:-1] + (layer,), open="bias")

    def _average(self, operands, factor: float):
        data, constant = operands if isinstance(operands[1], _Const) else operands[::-1]
        if isinstance(data, _Chain) and data.open == "sum" and isinstance(constant, _Const) \
                and constant.array.size == 1 and float(constant.array.reshape(-1)[0]) == factor:
            layer = data.layers[-1]
            layer = dataclasses.replace(layer, config=dict(layer.config, merge_mode="ave"))
            return dataclasses.replace(data, layers=data.layers[:-1] + (layer,), open="")
        return None

    def _op_Mul(self, operands, attributes):
        if all(isinstance(v, _Recurrent) for v in operands):
            return self._merge(operands[0], operands[1], "mul")
        average = self._average(operands, 0.5)
        if average is None:
            self.fail("multiplies tensors other than the two directions of a GRU, or their sum by 0.5")
        return average

    def _op_Div(self, operands, attributes):
        average = self._average(operands, 2.0) if isinstance(operands[1], _Const) else None
        if average is None:
            self.fail("divides anything but the sum of a GRU's two directions by 2")
        return average

    # ----- dense -----
    def _dense(self, chain: _Chain, kernel: np.ndarray, bias: np.ndarray | None) -> _Chain:
        """Append a Dense layer: x (..., I) @ kernel (I, U) (+ bias (U,))."""
        if chain.axes[-1] != FEATURE:
            self.fail(f"multiplies axes ({', '.join(chain.axes)}); a Dense layer acts on the last, feature axis")
        if kernel.dtype != np.float32 or kernel.ndim != 2 or kernel.shape[0] != chain.width:
            self.malformed(f"the weight is {kernel.dtype} {kernel.shape}; a Dense kernel here is float32 "
                           f"({chain.width}, units)")
        config = {"units": int(kernel.shape[1]), "activation": "linear", "use_bias": bias is not None}
        weights = {"kernel": np.ascontiguousarray(kernel)}
        if bias is not None:
            weights["bias"] = bias
        layer = Layer("dense", self.layer_name(), config, weights)
        return _Chain(chain.layers + (layer,), chain.axes, config["units"], chain.flipped,
                      open="bias" if bias is not None else "kernel")

    def _op_MatMul(self, operands, attributes):
        if isinstance(operands[0], _Const):
            self.fail("multiplies a constant by the data; a Dense layer is data @ weight")
        return self._dense(self.chain(operands[0]), self.constant(operands[1], "the weight"), None)

    def _op_Gemm(self, operands, attributes):
        chain = self.chain(operands[0])
        if chain.axes != (BATCH, FEATURE) or attributes.get("transA", 0):
            self.fail(f"Gemm on axes ({', '.join(chain.axes)}); a Dense Gemm takes (batch, features), transA=0")
        alpha, beta = attributes.get("alpha", 1.0), attributes.get("beta", 1.0)
        kernel = self.constant(operands[1], "the weight")
        kernel = kernel.T if attributes.get("transB", 0) else kernel
        bias = None
        if len(operands) > 2 and operands[2] is not None:
            bias = self.constant(operands[2], "the bias")
            units = kernel.shape[-1]
            if bias.dtype != np.float32 or bias.size not in (1, units):
                self.malformed(f"the bias is {bias.dtype} {bias.shape}; a Dense bias here is float32 ({units},)")
            bias = np.broadcast_to(bias.reshape(-1) * np.float32(beta), (units,)).astype(np.float32)
        return self._dense(chain, (kernel * np.float32(alpha)).astype(kernel.dtype) if alpha != 1 else kernel, bias)

    def _activation(self, operands, name: str):
        chain = self.chain(operands[0])
        if chain.open not in ("kernel", "bias"):
            self.fail("an activation is supported right after a MatMul/Gemm (+ bias), as a Dense layer's")
        layer = chain.layers[-1]
        layer = dataclasses.replace(layer, config=dict(layer.config, activation=name))
        return dataclasses.replace(chain, layers=chain.layers[:-1] + (layer,), open="")

    def _op_Relu(self, operands, attributes):
        return self._activation(operands, "relu")

    def _op_Sigmoid(self, operands, attributes):
        return self._activation(operands, "sigmoid")

    def _op_Tanh(self, operands, attributes):
        return self._activation(operands, "tanh")

    def _op_Softmax(self, operands, attributes):
        value = operands[0]
        rank = len(value.axes) if isinstance(value, (_Chain, _Recurrent)) else 0
        axis = attributes.get("axis", -1 if self.opset >= 13 else 1)
        if not rank or self.axis(value, axis) != rank - 1:
            self.fail("Softmax must run over the last (feature) axis")
        return self._activation(operands, "softmax")

    # ----- zeros -----
    def _op_ConstantOfShape(self, operands, attributes):
        fill = attributes.get("value")
        if fill is not None:
            from onnx import numpy_helper
            fill = numpy_helper.to_array(fill)
        if fill is not None and (fill.dtype != np.float32 or np.any(fill != 0)):
            self.fail("only a float32 zero fill is supported (an initial state of zeros)")
        return _Zeros()

    def _op_Expand(self, operands, attributes):
        value = operands[0]
        if isinstance(value, _Zeros) or (isinstance(value, _Const) and not np.any(value.array)):
            return _Zeros()
        self.fail(f"expands {_describe(value)}; only zeros (an initial state) are expanded")

    # ----- GRU -----
    def _op_GRU(self, operands, attributes):
        unknown = sorted(set(attributes) - GRU_ATTRIBUTES)
        if unknown:
            self.malformed(f"unknown attributes {unknown}")
        if "clip" in attributes:
            self.fail("the clip attribute (cell clipping) has no Keras equivalent")
        if attributes.get("layout", 0) != 0:
            self.fail("layout=1 (batch-major) is not run by onnxruntime; transpose to (time, batch, features)")
        operands = operands + [None] * (6 - len(operands))
        x, w, r, b, sequence_lens, initial_h = operands[:6]
        if sequence_lens is not None:
            self.fail("sequence_lens (per-sample lengths) is not supported: the engine runs every sample over the "
                      "whole time axis")
        x = self.chain(x)
        if x.axes != (TIME, BATCH, FEATURE):
            self.fail(f"input X has axes ({', '.join(x.axes)}); the model input is (batch, time, features) and a "
                      "GRU with layout=0 reads (time, batch, features), so a Transpose [1, 0, 2] belongs before it")
        direction = attributes.get("direction", "forward")
        if direction not in ("forward", "reverse", "bidirectional"):
            self.malformed(f"direction {direction!r} is not forward, reverse or bidirectional")
        count = 2 if direction == "bidirectional" else 1
        w, r = self.constant(w, "W"), self.constant(r, "R")
        b = None if b is None else self.constant(b, "B")
        units = r.shape[-1] if r.ndim == 3 else -1
        expected = {"W": (w, (count, 3 * units, x.width)), "R": (r, (count, 3 * units, units)),
                    "B": (b, (count, 6 * units))}
        for name, (array, shape) in expected.items():
            if array is not None and (array.shape != shape or array.dtype != np.float32):
                self.malformed(f"{name} is {array.dtype} {array.shape}; expected float32 {shape} "
                               f"({count} direction(s), hidden size {units}, input size {x.width})")
        if attributes.get("hidden_size", units) != units:
            self.malformed(f"hidden_size {attributes['hidden_size']} disagrees with R's hidden size {units}")
        linear_before_reset = attributes.get("linear_before_reset", 0)
        if linear_before_reset not in (0, 1):
            self.malformed(f"linear_before_reset is {linear_before_reset}; it must be 0 or 1")
        self._check_initial_h(initial_h, count, units)
        activations = self._activations(attributes, count, 2)
        directions = []
        for d in range(count):
            reverse = direction == "reverse" or d == 1
            recurrent_activation, activation = activations[2 * d:2 * d + 2]
            config = {"units": int(units), "activation": activation, "recurrent_activation": recurrent_activation,
                      "use_bias": b is not None, "reset_after": linear_before_reset == 1,
                      "return_sequences": False, "return_state": False, "go_backwards": reverse != x.flipped,
                      "zero_output_for_mask": False, "stateful": False}
            weights = {"kernel": np.ascontiguousarray(w[d].T), "recurrent_kernel": np.ascontiguousarray(r[d].T)}
            if b is not None:
                input_bias, recurrent_bias = b[d, :3 * units], b[d, 3 * units:]
                weights["bias"] = np.stack([input_bias, recurrent_bias]) if linear_before_reset \
                    else input_bias + recurrent_bias
            directions.append(_Direction(self.layer_name(), (self.node_index, d), config, weights, x, reverse))
        directions = tuple(directions)
        return [_Recurrent(directions, (TIME, DIRECTION, BATCH, FEATURE), sequence=True),
                _Recurrent(directions, (DIRECTION, BATCH, FEATURE), sequence=False)]

    def _check_initial_h(self, initial_h, count: int, units: int, name: str = "initial_h") -> None:
        if initial_h is None or isinstance(initial_h, _Zeros):
            return
        if isinstance(initial_h, _Const):
            if np.any(initial_h.array):
                self.fail(f"{name} is a non-zero constant; a bundle starts from zero or from the initial_state "
                          "passed to predict, so feed it as a graph input instead")
            return
        if not isinstance(initial_h, _StateInput) or initial_h.axes != (DIRECTION, BATCH, FEATURE) \
                or initial_h.directions != count:
            self.fail(f"{name} is {_describe(initial_h)}; expected zeros or a graph input ({count}, batch, "
                      f"{units})")

    def _activations(self, attributes, count: int, per_direction: int) -> list[str]:
        """ONNX activations (GRU [f, g], LSTM [f, g, h], RNN [f] per direction) -> Keras names;
        alpha/beta go only to the functions that take them."""
        defaults = {1: ["Tanh"], 2: ["Sigmoid", "Tanh"], 3: ["Sigmoid", "Tanh", "Tanh"]}[per_direction]
        names = attributes.get("activations", defaults * count)
        alphas = list(attributes.get("activation_alpha", []))
        betas = list(attributes.get("activation_beta", []))
        if len(names) != per_direction * count:
            self.malformed(f"{len(names)} activations for {count} direction(s); an {self.node.op_type} takes "
                           f"{per_direction} per direction")
        keras_names = []
        for name in names:
            keras_name, alpha, beta = ACTIVATIONS.get(name.lower(), (None, None, None))
            if keras_name is None:
                self.fail(f"activation {name} is not supported; supported: Sigmoid, Tanh, Relu, "
                          "HardSigmoid(alpha=1/6, beta=0.5), Affine(alpha=1, beta=0)")
            if alpha is not None:
                given = (alphas.pop(0) if alphas else None, betas.pop(0) if betas else None)
                if given[0] is None or not np.isclose(given[0], alpha, rtol=1e-6) \
                        or given[1] is None or not np.isclose(given[1], beta, rtol=1e-6):
                    self.fail(f"activation {name} with alpha, beta = {given}; only ({alpha:.6g}, {beta:.6g}) "
                              f"matches Keras's {keras_name}")
            keras_names.append(keras_name)
        return keras_names

    _op_LSTM = onnx_lstm.read_lstm
    _op_RNN = onnx_lstm.read_rnn
    _op_Conv = onnx_conv.read_conv
    _op_MaxPool = onnx_conv.read_max_pool
    _op_AveragePool = onnx_conv.read_average_pool
    _op_GlobalMaxPool = onnx_conv.read_global_max_pool
    _op_GlobalAveragePool = onnx_conv.read_global_average_pool
    _op_BatchNormalization = onnx_conv.read_batch_normalization

    # ----- outputs -----
    def outputs(self) -> tuple[_Chain, int]:
        """The chain the graph returns, and how many of the last layer's states it returns."""
        graph = self.model.graph
        if not graph.output:
            raise BundleError(f"{self.path}: the graph has no output")
        values = [self.values.get(output.name) for output in graph.output]
        producers = {name: node for node in graph.node for name in node.output}
        self.node = producers.get(graph.output[0].name) if graph.output else None
        if any(value is None for value in values):
            raise BundleError(f"{self.path}: a graph output is not computed by any node")
        if len(values) >= 2 and _directions_of_one_layer(values[0], values[1]):  # Bidirectional merge_mode=None
            chain, states = self._merge(values[0], values[1], None), values[2:]
        else:
            chain, states = self.chain(values[0]), values[1:]
        expected = (BATCH, TIME, FEATURE) if chain.layers and _is_sequence(chain) else (BATCH, FEATURE)
        if chain.axes != expected or chain.flipped or not chain.layers:
            raise UnsupportedModelError(
                f"{self.path}: output '{graph.output[0].name}' has axes ({', '.join(chain.axes)})"
                f"{', reversed in time' if chain.flipped else ''}; a gru-engine model returns "
                f"({', '.join(expected)}) computed by GRU layers")
        if states:
            keys = [(v.directions[0].key, v.carry) if isinstance(v, _Recurrent) and len(v.directions) == 1
                    and not v.sequence and v.axes == (BATCH, FEATURE) else None for v in states]
            carries = 2 if recurrent_kind(chain.layers[-1]) == "lstm" else 1
            if keys != [(key, carry) for key in chain.origin for carry in range(carries)]:
                raise UnsupportedModelError(
                    f"{self.path}: outputs {[o.name for o in graph.output[-len(states):]]} are not the final states "
                    "of the last layer's directions (in order; an LSTM's h then c), the only extra outputs a Keras "
                    "model returns")
        return chain, len(states)


def _directions_of_one_layer(forward, backward) -> bool:
    """Whether two values are a forward and a backward GRU direction over the same input, not yet merged."""
    if not all(isinstance(v, _Recurrent) and len(v.directions) == 1 for v in (forward, backward)):
        return False
    f, b = forward.directions[0], backward.directions[0]
    return f.source is b.source and forward.sequence == backward.sequence and not f.config["go_backwards"] \
        and b.config["go_backwards"]


def _text(value):
    """ONNX string attributes arrive as bytes."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, list):
        return [_text(item) for item in value]
    return value


def _is_sequence(chain: _Chain) -> bool:
    sequence = True
    for layer in chain.layers:
        if layer.kind in onnx_conv.frontends.GLOBAL_POOLING_KINDS:
            sequence = False
        sequence = recurrent_configs(layer)[-1]["return_sequences"] if recurrent_configs(layer) else sequence
    return sequence


def _match_reshape(axes: list, sizes: list, target: list):
    """Labels for ``target`` if it only inserts/removes size-1 axes around ``axes`` (None otherwise)."""
    core = [(axis, size) for axis, size in zip(axes, sizes) if axis != ONE]
    free = target.count(-1)
    if free > 1:
        return None

    def match(t: int, c: int) -> list | None:
        if t == len(target):
            return [] if c == len(core) else None
        entry = target[t]
        if c < len(core) and (entry == core[c][1] or entry == -1):
            rest = match(t + 1, c + 1)
            if rest is not None:
                return [core[c][0]] + rest
        if entry == 1:
            rest = match(t + 1, c)
            if rest is not None:
                return [ONE] + rest
        return None
    return match(0, 0)


def _finish_layers(layers: tuple, returned_states: int) -> list[Layer]:
    """Unique names, and return_state on the last layer when the graph returns its states."""
    finished, names = [], set()
    for index, layer in enumerate(layers):
        name = layer.name if layer.name and layer.name not in names else f"{layer.kind}_{index}"
        names.add(name)
        config = layer.config
        if returned_states and index == len(layers) - 1:
            if layer.kind != "bidirectional":
                config = dict(config, return_state=True)
            else:
                config = dict(config, forward=dict(config["forward"], return_state=True),
                              backward=dict(config["backward"], return_state=True))
        finished.append(Layer(layer.kind, name, config, layer.weights))
    return finished


def _load(onnx_path):
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise BundleError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, ...
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{path}: not a valid ONNX model ({first_line})") from None
    return model, path


def _onnxruntime_outputs(model, x: np.ndarray, path) -> list[np.ndarray]:
    """The graph's outputs for x, state inputs fed zeros (the engine's default carry)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        feeds = {}
        for index, value in enumerate(session.get_inputs()):
            if index == 0:
                feeds[value.name] = x
            else:
                shape = [d if isinstance(d, int) else x.shape[0] for d in value.shape]
                feeds[value.name] = np.zeros(shape, np.float32)
        return [np.asarray(y, np.float32) for y in session.run(None, feeds)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path}: onnxruntime cannot run the graph for the self-check: {exc}") from None


def read_onnx(onnx_path) -> ModelSpec:
    """An ONNX graph of GRU nodes as a validated ModelSpec, with a self-check made by onnxruntime."""
    import onnx
    import onnxruntime

    model, path = _load(onnx_path)
    reader = _Reader(model, path)
    reader.run()
    chain, returned_states = reader.outputs()
    source = {"framework": "onnx", "version": f"opset {reader.opset}",
              "producer": f"{model.producer_name} {model.producer_version}".strip(),
              "runtime": f"onnxruntime {onnxruntime.__version__}", "onnx": onnx.__version__}
    spec = ModelSpec(reader.features, _finish_layers(chain.layers, returned_states), source)
    validate(spec)
    dims = reader.main_input.type.tensor_type.shape.dim
    batch = dims[0].dim_value or SELF_CHECK_BATCH
    gates = [config.get("recurrent_activation", config["activation"]) for layer in spec.layers
             for config in recurrent_configs(layer)]
    steps = dims[1].dim_value or max(onnx_conv.frontends.min_steps(spec), SELF_CHECK_STEPS if set(gates) <= set(
        CONTRACTING_GATES) else EXPANDING_SELF_CHECK_STEPS)
    spec.self_check_input = sample_input(spec, batch, steps, np.random.default_rng(0))
    spec.self_check_outputs = _onnxruntime_outputs(model, spec.self_check_input, path)
    validate(spec)
    return spec


def import_onnx(onnx_path, out_path) -> Path:
    """Write an ONNX graph of GRU nodes as a bundle; the engine must reproduce onnxruntime first."""
    from gru_engine.runtime import Model

    spec = read_onnx(onnx_path)
    bundle.self_check(Model(spec), Path(onnx_path))
    return bundle.save(spec, out_path)
