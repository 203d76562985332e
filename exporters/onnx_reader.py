"""ONNX graph of GRU, LSTM and RNN nodes -> ModelSpec (``read_onnx``) -> self-checking bundle (``import_onnx``).

LSTM and RNN nodes are read by ``onnx_lstm`` (its docstring has their mapping), Conv, pooling and
BatchNormalization by ``onnx_conv``; this module's description of GRU nodes' glue, initial states,
sequence_lens and outputs holds for LSTM and RNN nodes too (an LSTM's initial_c and Y_c as its
initial_h and Y_h).

So that ONNX models from other frameworks run on the engine (PyTorch exports nn.GRU as one ONNX
GRU node per layer, gates already in z, r, h order, linear_before_reset=1). The graph is
interpreted node by node: every tensor is known as a constant, a shape vector, a zero tensor, a
state input, GRU outputs not yet turned into a layer, or "the model input after these layers, with
these axes"; each node extends that chain of layers or is refused with an error naming it.

Accepted (the modules: onnx_values the kinds of tensor, onnx_glue layout operators, onnx_heads
merges and Dense layers, onnx_recurrent what the recurrent nodes share, onnx_gru the GRU node,
onnx_outputs the graph's outputs and its interface):
- GRU (opset 7 on), direction forward, reverse or bidirectional, linear_before_reset 0 or 1,
  layout 0 or 1, every ONNX RNN activation with activation_alpha/beta (consumed as onnxruntime
  does: each list in order, by the functions that take it), clip; stacked nodes.
- X in the node's own layout: the model input may be (time, batch, features) or (batch, time,
  features), decided by the first GRU that reads it.
- sequence_lens: a graph input (int32, (batch,)) or a constant, the same for every GRU node; it
  becomes ``Model.predict(lengths=...)``: Y zero past a sample's length, Y_h its state at its last
  valid step, a reverse direction reading each sample backwards from there.
- initial_h: absent or zeros (also ConstantOfShape/Expand of zeros sized from the input's Shape, as
  PyTorch writes it), a non-zero constant, or graph inputs (sliced, unsqueezed, concatenated).
- Glue: Transpose, Squeeze, Unsqueeze, Reshape, Identity, Cast; Gather/Slice to pick a direction,
  reverse time (step -1) or take the last time step; Concat/Add/Mul (and Mul 0.5 or Div 2 after the
  Add) of the two directions of a bidirectional GRU: Keras merge modes concat, sum, mul, ave;
  Shape/Slice/Mul/Concat arithmetic on shape vectors.
- Dense: MatMul, or Gemm on 2-D data, with a constant weight; Add of a constant bias; then Relu,
  Sigmoid, Tanh or Softmax over the feature axis.
- Constants: initializers, Constant nodes, and any node whose inputs are all constant (folded,
  such as PyTorch's Slice/Concat/Unsqueeze reordering of its gates).
- Outputs: Y and/or Y_h of the last GRU in any layout (with their direction axis), or the chain's
  output (any axis order) and the final states (Y_h, also PyTorch's h_n of every layer).

Mapping, the inverse of ``onnx_writer``'s: kernel = W[d].T (I, 3H), recurrent_kernel = R[d].T
(H, 3H); linear_before_reset=1 is reset_after=True with bias = [Wb, Rb] (2, 3H);
linear_before_reset=0 is reset_after=False with bias = Wb + Rb (3H,): every bias term is then
added before its activation. A GRU reading its input from the end (a reverse direction, or a
forward GRU over a time-reversed input) is Keras go_backwards=True.

The bundle records the graph's interface (``gru_engine.interface``): which input is X and in which
layout, which is sequence_lens, how initial_h feeds each direction's ``initial_state``, and how each
graph output is built from ``predict``'s outputs, so that ``gru_engine.InferenceSession`` answers
as onnxruntime does. Its self-check feeds onnxruntime zeros for initial_h inputs and full lengths
(constants as they are); a layout=1 GRU, which onnxruntime refuses, is checked as the equivalent
layout=0 node between Transposes.

Refused (UnsupportedModelError naming the node or tensor): other operators, among them the Loop
that tf2onnx writes for a Keras GRU (import the native export instead); other activations; GRUs
with different sequence_lens; outputs that are not the chain's, its GRUs' final states, or one
GRU's Y/Y_h; a non-float32 model input. Malformed files (unreadable, failing onnx.checker, a GRU
weight that is not a constant or has the wrong shape, bad attributes) raise BundleError.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gru_engine import bundle
from gru_engine.errors import BundleError, UnsupportedModelError
from gru_engine.spec import Layer, ModelSpec, recurrent_configs, sample_input, validate

from . import onnx_conv, onnx_gru, onnx_lstm
from .keras_reader import SELF_CHECK_BATCH, SELF_CHECK_STEPS
from .onnx_glue import GlueOps
from .onnx_heads import HeadOps
from .onnx_outputs import OutputOps
from .onnx_recurrent import SwappedInput
from .onnx_values import (BATCH, DIRECTION, FEATURE, MAX_FOLDED_ELEMENTS, ONE, RECURRENT_OPS, SUPPORTED, TIME, _Chain,
                          _Const, _describe, _Lengths, _Recurrent, _StateInput, _text, carry_keys)

# With an update gate z outside [0, 1] (recurrent activation tanh, relu or linear), h' = z h + (1 - z) hh
# can grow the carry, and float32 rounding grows with it: onnxruntime and the engine order their sums
# differently, so such models are self-checked over fewer steps, where both still agree.
CONTRACTING_GATES = ("sigmoid", "hard_sigmoid")
EXPANDING_SELF_CHECK_STEPS = 4


class _Reader(GlueOps, HeadOps, OutputOps):
    def __init__(self, model, path, time_major: bool = False):
        self.model, self.path = model, path
        self.opset = next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
        self.producer = model.producer_name or ""
        self.values: dict[str, object] = {}
        self.node = None  # the node being read, named in errors
        self.node_index = 0
        # The model input's axes are a hypothesis until the first GRU reads it (see SwappedInput).
        self.input_axes = (TIME, BATCH, FEATURE) if time_major else (BATCH, TIME, FEATURE)
        self.input_settled = False
        self.initial_states: dict[tuple, dict | None] = {}  # recurrent direction key -> its initial state source
        self.state_axes: dict[str, tuple] = {}               # initial_h graph input -> its axes
        self.recurrent_count = 0
        self.lengths = None  # the recurrent nodes' sequence_lens: None, {"input": name} or {"values": [...]}

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
            config = dict(direction.config, return_sequences=value.sequence, zero_output_for_mask=not value.state)
            layer = Layer(direction.kind, direction.name, config, direction.weights)
            return _Chain(direction.source.layers + (layer,), tuple(ONE if a == DIRECTION else a for a in value.axes),
                          config["units"], direction.flipped and value.sequence, origin=carry_keys(direction),
                          keys=direction.source.keys + (carry_keys(direction),))
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
        self.batch_size = dims[self.input_axes.index(BATCH)].dim_value or BATCH
        self.time_size = dims[self.input_axes.index(TIME)].dim_value or TIME
        self.values[inputs[0].name] = _Chain((), self.input_axes, self.features)
        self.other_inputs = inputs[1:]
        for value in inputs[1:]:
            self.values[value.name] = self._other_input(value)
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
            raise UnsupportedModelError(f"{self.path}: input '{value.name}' must be (time, batch, features) or "
                                        "(batch, time, features) with a fixed feature count")
        return int(dims[2].dim_value)

    def _other_input(self, value):
        """A graph input after the first: sequence_lens (int32, (batch,)) or one on its way to initial_h."""
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value or None for d in tensor.shape.dim)
        if tensor.elem_type == 6 and len(dims) == 1:  # int32
            return _Lengths(value.name)
        if tensor.elem_type == 1 and len(dims) == 3:
            return _StateInput((DIRECTION, BATCH, FEATURE), tuple((value.name, i) for i in range(dims[0] or 0)), dims)
        if tensor.elem_type == 1 and len(dims) == 2:
            return _StateInput((BATCH, FEATURE), ((value.name, None),), dims)
        raise UnsupportedModelError(f"{self.path}: input '{value.name}' is neither the model input, nor sequence_lens "
                                    "(int32, (batch,)), nor an initial state (directions, batch, units) or "
                                    "(batch, units) float32")

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

    _op_GRU = onnx_gru.read_gru
    _op_LSTM = onnx_lstm.read_lstm
    _op_RNN = onnx_lstm.read_rnn
    _op_Conv = onnx_conv.read_conv
    _op_MaxPool = onnx_conv.read_max_pool
    _op_AveragePool = onnx_conv.read_average_pool
    _op_GlobalMaxPool = onnx_conv.read_global_max_pool
    _op_GlobalAveragePool = onnx_conv.read_global_average_pool
    _op_BatchNormalization = onnx_conv.read_batch_normalization


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


def _layout0(model):
    """The same graph with every layout=1 GRU (which onnxruntime refuses) as a layout=0 GRU between
    Transposes, exactly as the ONNX operator defines layout=1."""
    from onnx import helper

    model = type(model).FromString(model.SerializeToString())
    nodes = []
    for node in model.graph.node:
        layout = next((a for a in node.attribute if a.name == "layout"), None)
        if node.op_type != "GRU" or layout is None or layout.i != 1:
            nodes.append(node)
            continue
        node.attribute.remove(layout)
        inputs, outputs = list(node.input), list(node.output)
        before, after = [], []
        for position in (0, 5):  # X (B, T, I) and initial_h (B, D, H)
            if len(inputs) > position and inputs[position]:
                before.append(helper.make_node("Transpose", [inputs[position]], [inputs[position] + ".layout0"],
                                               perm=[1, 0, 2]))
                inputs[position] += ".layout0"
        for position, perm in ((0, [2, 0, 1, 3]), (1, [1, 0, 2])):  # Y (T, D, B, H), Y_h (D, B, H)
            if len(outputs) > position and outputs[position]:
                after.append(helper.make_node("Transpose", [outputs[position] + ".layout0"], [outputs[position]],
                                              perm=perm))
                outputs[position] += ".layout0"
        node.ClearField("input")
        node.input.extend(inputs)
        node.ClearField("output")
        node.output.extend(outputs)
        nodes += before + [node] + after
    model.graph.ClearField("node")
    model.graph.node.extend(nodes)
    return model


def _onnxruntime_outputs(model, interface: dict, x: np.ndarray, path) -> list[np.ndarray]:
    """The graph's outputs for x (batch, time, features): sequence_lens fed the full length, initial_h
    inputs zeros (the engine's default carry)."""
    import onnxruntime as ort

    from gru_engine.interface import arrange

    feeds = {}
    for entry in interface["inputs"]:
        if entry["role"] == "x":
            feeds[entry["name"]] = arrange(x, (BATCH, TIME, FEATURE), entry["axes"])
        elif entry["role"] == "lengths":
            feeds[entry["name"]] = np.full(x.shape[0], x.shape[1], np.int32)
        else:
            sizes = {BATCH: x.shape[0]}
            feeds[entry["name"]] = np.zeros([d if isinstance(d, int) else sizes.get(axis, 1)
                                             for d, axis in zip(entry["shape"], entry["axes"])], np.float32)
    try:
        session = ort.InferenceSession(_layout0(model).SerializeToString(), providers=["CPUExecutionProvider"])
        return [np.asarray(y, np.float32) for y in session.run(None, feeds)]
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"{path}: onnxruntime cannot run the graph for the self-check: {exc}") from None


def _read(model, path) -> tuple[_Reader, list[Layer], list[dict]]:
    """Read the graph with its input batch-major, or time-major when its first GRU says so."""
    for time_major in (False, True):
        reader = _Reader(model, path, time_major)
        try:
            reader.run()
        except SwappedInput:
            continue
        layers, records = reader.outputs()
        return reader, layers, records
    raise UnsupportedModelError(f"{path}: the model input reaches the first GRU neither time- nor batch-major")


def read_onnx(onnx_path) -> ModelSpec:
    """An ONNX graph of GRU nodes as a validated ModelSpec, with a self-check made by onnxruntime."""
    import onnx
    import onnxruntime

    from gru_engine.interface import constants, predict_outputs

    model, path = _load(onnx_path)
    reader, layers, records = _read(model, path)
    source = {"framework": "onnx", "version": f"opset {reader.opset}",
              "producer": f"{model.producer_name} {model.producer_version}".strip(),
              "runtime": f"onnxruntime {onnxruntime.__version__}", "onnx": onnx.__version__}
    spec = ModelSpec(reader.features, layers, source)
    spec.interface = reader.interface(records)
    validate(spec)
    states, lengths = constants(spec.interface)
    dims = {axis: dim for axis, dim in zip(reader.input_axes, spec.interface["inputs"][0]["shape"])}
    # The batch is fixed by any input with a fixed batch axis, or by constant lengths or initial_h.
    fixed = [entry["shape"][entry["axes"].index(BATCH)] for entry in spec.interface["inputs"]]
    fixed = [size for size in fixed if isinstance(size, int)] + [len(s) for s in states if s is not None]
    fixed += [len(lengths)] if lengths is not None else []
    batch = fixed[0] if fixed else SELF_CHECK_BATCH
    gates = [config.get("recurrent_activation", config["activation"]) for layer in spec.layers
             for config in recurrent_configs(layer)]
    steps = max(onnx_conv.frontends.min_steps(spec), SELF_CHECK_STEPS if set(gates) <= set(CONTRACTING_GATES)
                else EXPANDING_SELF_CHECK_STEPS)
    steps = dims[TIME] if isinstance(dims[TIME], int) else max(steps, max(lengths, default=1) if lengths is not None
                                                               else 1)
    spec.self_check_input = sample_input(spec, batch, steps, np.random.default_rng(0))
    outputs = _onnxruntime_outputs(model, spec.interface, spec.self_check_input, path)
    spec.self_check_outputs = predict_outputs(spec.interface, outputs, spec.output_count)
    if any(output is None for output in spec.self_check_outputs):
        raise UnsupportedModelError(f"{path}: the graph's outputs leave out part of what the model computes")
    validate(spec)
    return spec


def import_onnx(onnx_path, out_path) -> Path:
    """Write an ONNX graph of GRU nodes as a bundle; the engine must reproduce onnxruntime first."""
    from gru_engine.runtime import Model

    spec = read_onnx(onnx_path)
    bundle.self_check(Model(spec), Path(onnx_path))
    return bundle.save(spec, out_path)


def onnx_session(onnx_path, bundle_path=None):
    """onnxruntime's ``InferenceSession`` interface over an ONNX graph converted on the fly (written to
    ``bundle_path`` too when given)."""
    from gru_engine.runtime import Model
    from gru_engine.session import InferenceSession

    spec = read_onnx(onnx_path)
    model = Model(spec)
    bundle.self_check(model, Path(onnx_path))
    if bundle_path is not None:
        bundle.save(spec, bundle_path)
    return InferenceSession(model)
