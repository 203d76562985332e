"""The compiled runtime: a validated ``ModelSpec`` packed into one plan and one weight buffer.

Everything a kernel reads is checked here first (Numba does no bounds checking): input rank,
feature count, dtype, sizes, state shapes. Finite values are checked inside the kernel, for speed.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import numba
import numpy as np

from . import folding, frontends, transforms
from .kernels import activations, conv, lstm, plan, products, recurrent
from .kernels.transforms import S_FIRST, S_SECOND, S_SLOT, S_WIDTH
from .errors import InputError
from .spec import RECURRENT_FAMILIES, ModelSpec, activation_parameters, output_shapes, recurrent_kind, stream_blockers, validate

# Below this batch size, waking Numba's thread pool costs more than it saves.
PARALLEL_MIN_BATCH = 8
# Scratch plus output per call is bounded, so a huge shape is an error, not an out-of-memory crash.
MAX_CALL_FLOATS = 1 << 31
FLOAT32 = np.dtype(np.float32)
# Numeric dtypes accepted and cast to float32.
ACCEPTED_KINDS = "fiub"
# ``lengths`` left out: the kernels take an empty array for "every step of every sample".
NO_LENGTHS = np.zeros(0, np.int64)


def pad_columns(matrix, width):
    """Zero columns appended up to ``width`` (the kernels' padded gate-row width)."""
    matrix = np.asarray(matrix, np.float32)
    padding = [(0, 0)] * (matrix.ndim - 1) + [(0, width - matrix.shape[-1])]
    return np.pad(matrix, padding)


def recurrent_kernel_blocks(config, recurrent_kernel, width):
    """The layout gru_layer reads: (H, P) zero padded, or for reset_after=False the z|r block
    (H, 2H) followed by the h block (H, H), because that variant multiplies them by different vectors
    (then padded to H * P floats so every layout has the same size)."""
    if config["reset_after"]:
        return pad_columns(recurrent_kernel, width)
    two = 2 * config["units"]
    blocks = np.concatenate([recurrent_kernel[:, :two].ravel(), recurrent_kernel[:, two:].ravel()])
    return pad_columns(blocks, config["units"] * width)


def gru_tensors(config, weights, prefix, width) -> dict:
    """A GRU direction's packed tensors (see ``kernels.gru.gru_layer``)."""
    units = config["units"]
    bias = weights.get(prefix + "bias")
    if bias is None:
        input_bias = recurrent_bias = np.zeros(3 * units, np.float32)
    elif config["reset_after"]:
        # Both biases of z and r are added to the same sum: fold them into one, which the
        # kernel's recurrent sum starts from.
        two = 2 * units
        input_bias = np.concatenate([bias[0, :two] + bias[1, :two], bias[0, two:]])
        recurrent_bias = np.concatenate([np.zeros(two, np.float32), bias[1, two:]])
    else:
        input_bias, recurrent_bias = bias, np.zeros(3 * units, np.float32)
    return {
        "kernel": pad_columns(weights[prefix + "kernel"], width),
        "recurrent_kernel": recurrent_kernel_blocks(config, weights[prefix + "recurrent_kernel"], width),
        "input_bias": pad_columns(input_bias, width),
        "recurrent_bias": pad_columns(recurrent_bias, width),
        "option": int(config["reset_after"]),
    }


def lstm_tensors(config, weights, prefix, width) -> dict:
    """An LSTM direction's packed tensors: gate columns reordered i | f | o | c (``kernels.lstm``)."""
    units = config["units"]

    def reorder(matrix):
        blocks = np.split(np.asarray(matrix, np.float32), 4, axis=-1)
        return pad_columns(np.concatenate([blocks[gate] for gate in lstm.PACKED_GATES], axis=-1), width)

    bias = weights.get(prefix + "bias", np.zeros(4 * units, np.float32))
    return {"kernel": reorder(weights[prefix + "kernel"]),
            "recurrent_kernel": reorder(weights[prefix + "recurrent_kernel"]), "input_bias": reorder(bias)}


def simple_rnn_tensors(config, weights, prefix, width) -> dict:
    """A SimpleRNN direction's packed tensors (``kernels.simple_rnn``)."""
    bias = weights.get(prefix + "bias", np.zeros(config["units"], np.float32))
    return {"kernel": pad_columns(weights[prefix + "kernel"], width),
            "recurrent_kernel": pad_columns(weights[prefix + "recurrent_kernel"], width),
            "input_bias": pad_columns(bias, width)}


# Per recurrent family: its cell code in the plan and how its tensors are packed.
PACKERS = {
    "gru": (recurrent.CELL_GRU, gru_tensors),
    "lstm": (recurrent.CELL_LSTM, lstm_tensors),
    "simple_rnn": (recurrent.CELL_SIMPLE_RNN, simple_rnn_tensors),
}


def masked_output(config, streaming: bool) -> int:
    if config["zero_output_for_mask"]:
        return recurrent.MASKED_ZERO
    return recurrent.MASKED_CARRY if streaming else recurrent.MASKED_PREVIOUS


# Numba's fallback 'workqueue' threading layer aborts the process when two threads launch parallel
# kernels at once; 'omp' and 'tbb' do not. Parallel launches are serialised unless the layer is safe.
_PARALLEL_LAUNCH = threading.Lock()


def parallel_launch_is_thread_safe() -> bool:
    try:
        return numba.threading_layer() in ("omp", "tbb")
    except ValueError:  # no parallel kernel has run yet, so no layer is chosen
        return False


KERAS_CLASS_NAMES = {"masking": "Masking", "bidirectional": "Bidirectional", "dense": "Dense",
                     **{kind: family.keras_class for kind, family in RECURRENT_FAMILIES.items()},
                     **frontends.KERAS_CLASS_NAMES}
FRONTEND_KIND_CODES = {"conv1d": plan.KIND_CONV1D, "max_pooling1d": plan.KIND_MAX_POOLING,
                       "average_pooling1d": plan.KIND_AVERAGE_POOLING,
                       "global_max_pooling1d": plan.KIND_GLOBAL_MAX_POOLING,
                       "global_average_pooling1d": plan.KIND_GLOBAL_AVERAGE_POOLING,
                       "batch_normalization": plan.KIND_BATCH_NORMALIZATION}


# Cache-line size: a 512-bit load from an address that is not a multiple of it touches two lines.
ALIGNMENT_BYTES = 64


def aligned_empty(shape) -> np.ndarray:
    """An uninitialised float32 C-contiguous array whose data starts on a cache line.

    numpy only promises 16-byte alignment, and the kernels' vector loads of weight and scratch
    rows run up to 1.5x slower when rows straddle cache lines (measured: GRU(128), T=100:
    166 us aligned, 249 us at a 16-byte offset), which made timings vary from process to process.
    """
    size = int(np.prod(shape))
    lanes = ALIGNMENT_BYTES // FLOAT32.itemsize
    buffer = np.empty(size + lanes, np.float32)
    start = -(buffer.__array_interface__["data"][0] // FLOAT32.itemsize) % lanes
    return buffer[start:start + size].reshape(shape)


class _Program:
    """A plan and packed weights; ``streaming`` makes every recurrent layer emit each step's output.

    The bundle's transforms are folded into the weights or become steps of the plan (see
    ``folding``); ``fold=False`` runs every one of them as a step.
    """

    def __init__(self, spec: ModelSpec, shapes, streaming: bool, fold: bool = True):
        rows, chunks = [], []
        offset = 0

        def put(array) -> int:
            nonlocal offset
            start = offset
            flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
            # Every tensor starts on a cache line (see aligned_empty).
            padding = np.zeros(-flat.size % products.LANES, np.float32)
            chunks.extend((flat, padding))
            offset += flat.size + padding.size
            return start

        carry_dims, carry_shapes = [], []
        max_dim, max_gate_width = spec.input_features, 3

        def direction_block(kind, config, weights, prefix) -> list[int]:
            nonlocal max_gate_width
            units = config["units"]
            width = int(products.padded(RECURRENT_FAMILIES[kind].gates * units))
            max_gate_width = max(max_gate_width, width)
            cell, pack = PACKERS[kind]
            tensors = pack(config, weights, prefix, width)
            block = {
                "cell": cell,
                "units": units,
                "activation": activations.ACTIVATION_CODES[config["activation"]],
                "recurrent_activation": activations.ACTIVATION_CODES[config.get("recurrent_activation", "linear")],
                "go_backwards": int(config["go_backwards"]),
                "return_sequences": int(config["return_sequences"] or streaming),
                "masked_output": masked_output(config, streaming),
                "carry": sum(carry_dims),
                "option": tensors.pop("option", 0),
                "recurrent_bias": 0,
                "params": activation_params(config) if kind == "gru" else recurrent.NO_PARAMS,
            }
            block.update({name: put(array) for name, array in tensors.items()})
            carry_dims.extend([units] * RECURRENT_FAMILIES[kind].carries)
            carry_shapes.extend([(units,)] * RECURRENT_FAMILIES[kind].carries)
            return [block[name] for name in recurrent.DIRECTION_BLOCK]

        def activation_params(config) -> int:
            """PARAMS_SIZE floats for ONNX activation parameters and clip, only when a GRU direction has them."""
            parameters = activation_parameters(config)
            if parameters is None:
                return recurrent.NO_PARAMS
            return put(np.float32(parameters))

        def frontend_row(row, layer, input_dim):
            """Fill the plan row of a front-end layer."""
            config, weights = layer.config, layer.weights
            row[plan.COL_KIND] = FRONTEND_KIND_CODES[layer.kind]
            if layer.kind == "conv1d":
                taps, groups, filters = config["kernel_size"], config["groups"], config["filters"]
                # (K, I/G, F) -> (G, K, I/G, F/G): each group's tap a contiguous (channels, filters) matrix,
                # or, for dot products along a window, (F, K * I).
                kernel = weights["kernel"].reshape(taps, input_dim // groups, groups, filters // groups)
                if conv.kernel_layout(groups, config["dilation_rate"], taps, input_dim) == conv.LAYOUT_DOTS:
                    kernel = kernel.reshape(taps * input_dim, filters).T
                else:
                    kernel = kernel.transpose(2, 0, 1, 3)
                row[plan.COL_CONV_ACTIVATION] = activations.ACTIVATION_CODES[config["activation"]]
                row[plan.COL_CONV_KERNEL] = put(kernel)
                row[plan.COL_CONV_BIAS] = put(weights.get("bias", np.zeros(filters, np.float32)))
                row[plan.COL_CONV_GROUPS], row[plan.COL_CONV_SIZE] = groups, taps
                row[plan.COL_CONV_STRIDES], row[plan.COL_CONV_DILATION] = config["strides"], config["dilation_rate"]
                row[plan.COL_CONV_PADDING] = frontends.padding_code(config["padding"])
                row[plan.COL_CONV_HISTORY] = -1
                history = frontends.history_steps(layer)
                if streaming and history:
                    # A stream keeps the layer's last inputs in the carry instead of zero padding.
                    row[plan.COL_CONV_HISTORY] = sum(carry_dims)
                    carry_dims.append(history * input_dim)
                    carry_shapes.append((history, input_dim))
            elif layer.kind in frontends.POOLING_KINDS:
                row[plan.COL_POOL_SIZE], row[plan.COL_POOL_STRIDES] = config["pool_size"], config["strides"]
                row[plan.COL_POOL_PADDING] = frontends.padding_code(config["padding"])
            elif layer.kind == "batch_normalization":
                scale, shift = frontends.batch_norm_affine(layer)
                row[plan.COL_NORM_SCALE], row[plan.COL_NORM_SHIFT] = put(scale), put(shift)

        def step_rows(steps, dim, width) -> list[np.ndarray]:
            """Plan rows of transform steps applied to the leading ``width`` of ``dim`` values."""
            step_rows = []
            for step in steps:
                row = np.zeros(plan.PLAN_WIDTH, np.int64)
                row[plan.COL_KIND], row[plan.COL_IN], row[plan.COL_OUT] = step.kind, dim, dim
                row[plan.COL_STEP + S_WIDTH], row[plan.COL_STEP + S_SLOT] = width, step.slot
                for column, values in ((S_FIRST, step.first), (S_SECOND, step.second)):
                    if values is not None:
                        row[plan.COL_STEP + column] = put(values)
                step_rows.append(row)
            return step_rows

        layers, input_steps, output_steps = folding.compile_steps(spec.transforms, spec.layers, fold)
        rows += step_rows(input_steps, spec.input_features, spec.input_features)
        # A BatchNormalization right after a linear Conv1D or Dense is folded into its weights.
        for layer, shape in frontends.fold_batch_norms(layers, shapes):
            row = np.zeros(plan.PLAN_WIDTH, np.int64)
            row[plan.COL_IN], row[plan.COL_OUT] = shape.input_dim, shape.output_dim
            max_dim = max(max_dim, shape.output_dim)
            if layer.kind in frontends.KINDS:
                frontend_row(row, layer, shape.input_dim)
            elif layer.kind == "masking":
                row[plan.COL_KIND] = plan.KIND_MASKING
                row[plan.COL_MASK_VALUE] = put(np.float32([layer.config["mask_value"]]))
            elif layer.kind == "dense":
                units = layer.config["units"]
                row[plan.COL_KIND] = plan.KIND_DENSE
                row[plan.COL_DENSE_ACTIVATION] = activations.ACTIVATION_CODES[layer.config["activation"]]
                row[plan.COL_DENSE_KERNEL] = put(layer.weights["kernel"])
                row[plan.COL_DENSE_BIAS] = put(layer.weights.get("bias", np.zeros(units, np.float32)))
            elif layer.kind == "bidirectional":
                kind = recurrent_kind(layer)
                row[plan.COL_KIND] = plan.KIND_BIDIRECTIONAL
                row[plan.COL_MERGE] = recurrent.MERGE_CODES[layer.config["merge_mode"]]
                row[plan.COL_FORWARD:plan.COL_BACKWARD] = direction_block(
                    kind, layer.config["forward"], layer.weights, "forward.")
                row[plan.COL_BACKWARD:plan.COL_BACKWARD + recurrent.BLOCK_WIDTH] = direction_block(
                    kind, layer.config["backward"], layer.weights, "backward.")
            else:  # gru, lstm, simple_rnn: one direction block, whose cell is the row's kind
                row[plan.COL_FORWARD:plan.COL_BACKWARD] = direction_block(layer.kind, layer.config, layer.weights, "")
                row[plan.COL_KIND] = row[plan.COL_FORWARD + recurrent.B_CELL]
            rows.append(row)
        # Output steps undo the transforms on the main output: for merge_mode=None, the forward half.
        rows += step_rows(output_steps, shapes[-1].output_dim, output_shapes(spec, shapes, 1, 1)[0][-1])
        self.plan = np.stack(rows)                                        # (L, PLAN_WIDTH)
        packed = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
        self.weights = aligned_empty(packed.shape)  # (W,)
        self.weights[:] = packed
        self.spec = spec
        self.means_size = int(plan.kept_means(self.plan, spec.input_features))
        self.carry_dims = carry_dims
        self.carry_shapes = carry_shapes  # per carry: (units,), or (steps, channels) for a Conv1D history
        self.carry_size = sum(carry_dims)
        # Row widths of the scratch arrays, whole cache lines so that every row starts on one.
        self.max_dim = int(products.padded(max_dim))
        self.max_gate_width = int(products.padded(max_gate_width))
        last = shapes[-1]
        self.output_dim = last.output_dim
        self.output_is_sequence = last.output_is_sequence or streaming

    def parallel(self, batch: int) -> bool:
        return batch >= PARALLEL_MIN_BATCH and numba.get_num_threads() > 1

    def workspace_shape(self, batch: int, steps: int, parallel: bool) -> tuple[int, int]:
        """(blocks, K): one block's scratch, or one per block when blocks run in parallel."""
        blocks = -(-batch // products.BLOCK) if parallel else 1
        return blocks, plan.workspace_size(min(batch, products.BLOCK), steps, self.max_dim, self.max_gate_width,
                                           self.means_size)

    def check_size(self, batch: int, steps: int) -> None:
        """Refuse a call too short for a 'valid' window, or whose scratch, carries and output would
        exceed MAX_CALL_FLOATS."""
        short = frontends.too_short(self.spec, steps)
        if short:
            raise InputError(short)
        blocks, size = self.workspace_shape(batch, steps, parallel=True)
        if blocks * size + batch * (self.carry_size + steps * self.output_dim) > MAX_CALL_FLOATS:
            raise InputError(f"an input of batch {batch} and {steps} time steps needs more than "
                             f"{MAX_CALL_FLOATS * 4 >> 30} GiB of scratch; split it into smaller batches")

    def workspace(self, batch: int, steps: int, parallel: bool) -> np.ndarray:
        """Scratch for one call; every allocation path goes through the size check here."""
        self.check_size(batch, steps)
        return aligned_empty(self.workspace_shape(batch, steps, parallel))

    def output_shape(self, batch: int, steps: int) -> tuple[int, int]:
        """(B, rows * D), rows = the last sequence's steps when the last layer returns sequences, else 1."""
        rows = frontends.output_steps(self.spec, steps) if self.output_is_sequence else 1
        return batch, rows * self.output_dim

    def returned_shape(self, batch: int, steps: int) -> tuple[int, ...]:
        """The main output as predict returns it: output_shape's (B, rows * D) as (B, rows, D) for
        sequences."""
        batch, width = self.output_shape(batch, steps)
        return (batch, width // self.output_dim, self.output_dim) if self.output_is_sequence else (batch, width)

    def output(self, batch: int, steps: int) -> np.ndarray:
        return np.empty(self.output_shape(batch, steps), np.float32)

    def run(self, x, carry, work, out, zero_carry=False, lengths=NO_LENGTHS) -> None:
        """Run the plan on x (B, T, F) from ``carry`` (B, C), or from zero state with ``zero_carry``;
        ``lengths`` (B,) int64 masks each sample's steps from its length on."""
        if work.shape[0] == 1:
            bad = plan.run_batch(self.plan, self.weights, x, lengths, carry, work, self.max_dim,
                                 self.max_gate_width, zero_carry, out)
        else:
            args = (self.plan, self.weights, x, lengths, carry, work, self.max_dim, self.max_gate_width, zero_carry,
                    out)
            if parallel_launch_is_thread_safe():
                bad = plan.run_batch_parallel(*args)
            else:
                with _PARALLEL_LAUNCH:
                    bad = plan.run_batch_parallel(*args)
        if bad:
            self._refuse(bad, x)

    def bind(self, carry, work):
        """``run`` from and into ``carry`` on ``work`` as a call of (x, out) alone: a stream makes it
        every step or chunk, and the Python between it and the kernel is most of a step's overhead."""
        if work.shape[0] != 1:
            return lambda x, out: self.run(x, carry, work, out)
        kernel = functools.partial(plan.run_batch, self.plan, self.weights)
        max_dim, max_gate_width = self.max_dim, self.max_gate_width

        def advance(x, out):
            bad = kernel(x, NO_LENGTHS, carry, work, max_dim, max_gate_width, False, out)
            if bad:
                self._refuse(bad, x)

        return advance

    def _refuse(self, bad: int, x) -> None:
        if bad == plan.WRONG_WIDTH:
            raise InputError(f"x has {x.shape[2]} features per step; this model was compiled for "
                             f"{self.plan[0, plan.COL_IN]}")
        if bad == plan.TRANSFORM_NOT_FINITE:
            raise InputError("the bundle's input transforms turn this input into NaN or infinite values: "
                             "a 'log' step needs every value it receives > 0, and an 'affine' step must not "
                             "overflow float32")
        raise InputError(f"{bad} input sequence(s) contain NaN or infinite values; "
                         "replace or drop them (for padding, use a Masking layer and a finite pad value)")


def as_array(value, what: str) -> np.ndarray:
    """``value`` as a numpy array, or an InputError saying why it cannot be one (ragged lists...)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what} cannot be read as a numeric array: {exc}") from None


def as_input(x, features: int, check_size=None) -> np.ndarray:
    """Check and coerce an input to a C-contiguous float32 (batch, time, features) array.

    ``check_size(batch, time)`` runs before the cast, so a huge input is refused before it is copied.
    """
    if type(x) is np.ndarray and x.dtype is FLOAT32 and x.ndim == 3 and x.flags.c_contiguous:
        batch, steps, width = x.shape
        if width == features and batch and steps:
            return x  # the common case, checked in about 150 ns
    x = as_array(x, "x")
    if x.dtype.kind not in ACCEPTED_KINDS:
        raise InputError(f"x has dtype {x.dtype}; pass a numeric array (it is cast to float32)")
    if x.ndim != 3:
        hint = " (add a batch axis: x[None])" if x.ndim == 2 else ""
        raise InputError(f"x must have shape (batch, time, {features}), got shape {x.shape}{hint}")
    if x.shape[2] != features:
        raise InputError(f"x has {x.shape[2]} features per time step; this model takes {features}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise InputError(f"x has shape {x.shape}; batch and time must both be at least 1")
    if check_size is not None:
        check_size(x.shape[0], x.shape[1])
    return np.ascontiguousarray(x, dtype=np.float32)


def as_lengths(lengths, batch: int, steps: int) -> np.ndarray:
    """Check per-sample lengths: integers in [1, steps], one per sample; as a (batch,) int64 array."""
    lengths = as_array(lengths, "lengths")
    if lengths.dtype.kind not in "iu" or lengths.shape != (batch,):
        raise InputError(f"lengths must be an integer array of shape ({batch},), one length per sample, "
                         f"got {lengths.dtype} {lengths.shape}")
    if batch and (lengths.min() < 1 or lengths.max() > steps):
        raise InputError(f"lengths must lie between 1 and the {steps} time steps of x, got values from "
                         f"{lengths.min()} to {lengths.max()}")
    return np.ascontiguousarray(lengths, np.int64)


def fill_carry(states, batch: int, program: _Program, carry=None) -> np.ndarray:
    """Carries (B, C) zeroed, or filled from ``states``: one array per carry of ``program``, (batch,)
    + its shape (Keras-style ``initial_state`` for predict, ``Stream.state`` for a stream)."""
    if carry is None:
        carry = np.zeros((batch, program.carry_size), np.float32)  # (B, C)
    else:
        carry.fill(0.0)
    if states is None:
        return carry
    states = [states] if isinstance(states, np.ndarray) else list(states)
    shapes = [(batch,) + shape for shape in program.carry_shapes]
    if len(states) != len(shapes):
        raise InputError(f"initial_state needs {len(shapes)} arrays (one per carry: h per GRU or SimpleRNN "
                         "direction, h then c per LSTM direction, and in a stream the last inputs of each causal "
                         f"Conv1D; shapes {shapes}), got {len(states)}")
    offset = 0
    for index, (state, shape, size) in enumerate(zip(states, shapes, program.carry_dims)):
        state = as_array(state, f"initial_state[{index}]")
        if state.dtype.kind not in ACCEPTED_KINDS or state.shape != shape:
            raise InputError(f"initial_state[{index}] must be a numeric array of shape {shape}, "
                             f"got {state.dtype} {state.shape}")
        if not np.isfinite(state).all():
            raise InputError(f"initial_state[{index}] contains NaN or infinite values")
        carry[:, offset:offset + size] = state.reshape(batch, size)
        offset += size
    return carry


def check_out(out, shape) -> None:
    """Refuse an ``out=`` array the kernel cannot write the result into as it is."""
    if type(out) is not np.ndarray or out.dtype is not FLOAT32 or out.shape != shape \
            or not out.flags.c_contiguous or not out.flags.writeable:
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise InputError(f"out must be a writable C-contiguous float32 array of shape {shape}, got {got}")


class Model:
    """A model ready to run. Build it with ``gru_engine.load`` or ``Model(spec)``.

    ``fold_transforms=False`` runs every transform step in the compiled call instead of folding
    affine steps into the weights (to check that folding changes nothing beyond rounding).
    """

    def __init__(self, spec: ModelSpec, fold_transforms: bool = True):
        self.spec = spec
        self.shapes = validate(spec)
        self._fold = fold_transforms
        self._program = _Program(spec, self.shapes, streaming=False, fold=fold_transforms)
        self._raw = None if spec.transforms else self  # predict_raw's model, made when first needed
        # Inputs are checked against what the plan was built for, not a spec field that could change.
        self._features = spec.input_features
        self._single_output = spec.output_count == 1
        # The kernel's (B, D) output is already what predict returns: no reshape, no list.
        self._plain_output = self._single_output and not self._program.output_is_sequence
        # Per-thread scratch, reused while the input shape stays the same: calls from several
        # threads never share a buffer, and a tight loop of predict() allocates only its output.
        self._scratch = threading.local()

    def __reduce__(self):
        """Pickle as the bundle's bytes: weights copied, not the file mapping (the receiving process
        may not see the file). Unpickling validates them and replays the self-check, as ``load`` does."""
        from . import bundle, loads
        return loads, (bundle.to_bytes(self.spec), self.spec.self_check_input is not None)

    @property
    def input_features(self) -> int:
        return self._features

    @property
    def state_shapes(self) -> list[int]:
        """Units of each carry in layer order: h per GRU or SimpleRNN direction, h then c per LSTM one."""
        return list(self._program.carry_dims)

    def _initial_carry(self, initial_state, batch: int, carry=None) -> np.ndarray:
        """Carries (B, C) zeroed, or filled from Keras-style ``initial_state``: one array per carry
        (see ``state_shapes``), in layer order."""
        return fill_carry(initial_state, batch, self._program, carry)

    def predict(self, x, initial_state=None, out=None, lengths=None):
        """Run the model on x (batch, time, features); returns what Keras ``model.predict`` returns.

        ``out``: a float32 array of the returned shape to write the result into (then returned),
        for a model with one output; a call with ``out`` allocates nothing once the input shape
        has been seen.

        ``lengths`` (batch,) ints: sample s is x[s, :lengths[s]], the rest trailing padding. As with
        a Keras mask, the recurrent layers skip padded steps (carrying the state through), and their
        sequences there are zero, or repeat the last output, per ``zero_output_for_mask``.
        """
        return self._run(as_input(x, self._features, self._program.check_size), initial_state, out, lengths)

    def predict_raw(self, x, initial_state=None, lengths=None):
        """``predict`` without the bundle's input/output transforms (the network's own units)."""
        return self._raw_model().predict(x, initial_state, lengths=lengths)

    def _raw_model(self) -> "Model":
        if self._raw is None:
            self._raw = Model(dataclasses.replace(self.spec, transforms=[]))
        return self._raw

    def predict_states(self, x, initial_state=None, lengths=None):
        """``predict_raw``, and the final carries (see ``state_shapes``) in layer order, (batch, units) each."""
        raw = self._raw_model()
        outputs = raw.predict(x, initial_state, lengths=lengths)
        carry, carries, offset = raw._scratch.carry, [], 0
        for units in raw._program.carry_dims:
            carries.append(carry[:, offset:offset + units].copy())
            offset += units
        return outputs, carries

    def _lengths(self, lengths, batch: int, steps: int) -> np.ndarray:
        blocker = frontends.lengths_blocker(self.spec)
        if blocker:
            raise InputError(blocker)
        return as_lengths(lengths, batch, steps)

    def _run(self, x, initial_state, out=None, lengths=None):
        batch, steps = x.shape[0], x.shape[1]
        program = self._program
        scratch = self._scratch
        # Skips asking Numba for its thread count (~0.6 us) where the answer cannot matter.
        parallel = batch >= PARALLEL_MIN_BATCH and program.parallel(batch)
        key = (batch, steps, parallel)
        if getattr(scratch, "key", None) != key:
            scratch.work = program.workspace(batch, steps, parallel)
            scratch.carry = np.empty((batch, program.carry_size), np.float32)
            scratch.output_shape = program.output_shape(batch, steps)
            scratch.returned_shape = program.returned_shape(batch, steps)
            scratch.key = key
        carry = scratch.carry
        lengths = NO_LENGTHS if lengths is None else self._lengths(lengths, batch, steps)
        if out is not None:
            if not self._single_output:
                raise InputError("out= needs a model with one output; this one returns "
                                 f"{self.spec.output_count}")
            check_out(out, scratch.returned_shape)
            result = out
            out = out.reshape(scratch.output_shape)  # a view: (B, rows * D), the kernel's layout
        if initial_state is not None:
            self._initial_carry(initial_state, batch, carry)
        if out is None:
            out = np.empty(scratch.output_shape, FLOAT32)
            result = out if self._plain_output else None
        program.run(x, carry, scratch.work, out, zero_carry=initial_state is None, lengths=lengths)
        if result is not None:
            return result
        return self._outputs(out, carry, batch, steps)

    def _outputs(self, out, carry, batch, steps):
        main = out.reshape((batch, -1, self._program.output_dim)) if self._program.output_is_sequence else out
        if self._single_output:
            return main
        shapes = output_shapes(self.spec, self.shapes, batch, steps)
        layer = self.spec.layers[-1]
        outputs = []
        if layer.kind == "bidirectional" and layer.config["merge_mode"] is None:
            forward_units = self.shapes[-1].state_dims[0]
            outputs += [main[..., :forward_units], main[..., forward_units:]]
        else:
            outputs.append(main)
        last_dims = self.shapes[-1].state_dims
        start = self._program.carry_size - sum(last_dims)
        for units in last_dims[:len(shapes) - len(outputs)]:
            outputs.append(carry[:, start:start + units].copy())
            start += units
        return outputs

    def stream(self, batch: int = 1) -> "Stream":
        """A stateful stream: feed one time step at a time, the carries kept between calls."""
        return Stream(self, batch)

    def summary(self, print_fn=print) -> None:
        """Print layers, output shapes and parameter counts, as Keras's ``model.summary()`` does."""
        lines = [f"{'Layer (type)':<34}{'Output Shape':<22}{'Param #':>10}", "=" * 66]
        for layer, shape in zip(self.spec.layers, self.shapes):
            dims = (None, None, shape.output_dim) if shape.output_is_sequence else (None, shape.output_dim)
            lines.append(f"{layer.name + ' (' + KERAS_CLASS_NAMES[layer.kind] + ')':<34}{str(dims):<22}"
                         f"{shape.parameters:>10,}")
        source = self.spec.source
        lines += ["=" * 66, f"Total params: {self.spec.parameter_count:,}",
                  f"Input: (batch, time, {self.spec.input_features}) float32",
                  f"Source: {source.get('framework', '?')} {source.get('version', '')}"
                  + (f" ({source['backend']} backend)" if "backend" in source else "")]
        print_fn("\n".join(lines))


class Stream:
    """Step-by-step inference with carried state. Buffers are made once, here.

    A stream is serialised by a lock: two threads stepping one stream take turns. Use one stream
    per thread for parallel work.
    """

    def __init__(self, model: Model, batch: int):
        if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or not 1 <= batch <= 1 << 20:
            raise InputError(f"stream batch must be an int between 1 and {1 << 20}, got {batch!r}")
        blockers = stream_blockers(model.spec)
        if blockers:
            name, why = blockers[0]
            raise InputError(f"layer '{name}' {why}; such a model cannot stream (use predict on whole sequences)")
        if not transforms.streamable(model.spec.transforms):
            raise InputError("this bundle's transforms look at whole windows (per-window centering); "
                             "use predict on complete windows instead of a stream")
        self.model = model
        self.batch = int(batch)
        self._program = _Program(model.spec, model.shapes, streaming=True, fold=model._fold)
        features = model.input_features
        self._x = np.zeros((self.batch, 1, features), np.float32)           # (B, 1, F)
        self._parallel = self._program.parallel(self.batch)
        # First, so the size check also bounds the carries (a Conv1D's history can be large).
        self._work = self._program.workspace(self.batch, 1, self._parallel)  # (blocks, K)
        self._carry = np.zeros((self.batch, self._program.carry_size), np.float32)  # (B, C)
        self._out = self._program.output(self.batch, 1)                     # (B, D)
        # Views made once, so a step only copies x_t in and makes one compiled call.
        self._x_rows = self._x[:, 0, :]                                     # (B, F)
        self._shapes = {(self.batch, features): (self._x_rows, self._out)}
        if self.batch == 1:
            self._shapes[(features,)] = (self._x_rows[0], self._out[0])     # (F,), (D,)
        self._advance = self._program.bind(self._carry, self._work)
        # run's scratch as (steps, work): grown to the longest chunk so far, read and replaced as one
        # object, so a call never pairs a chunk with scratch made for a shorter one.
        self._chunk_work = (1, self._work)
        # The last chunk length's (x shape, returned shape, kernel's out shape, bound call): a chunk of
        # that length, already float32 and contiguous, goes from run to the kernel without other checks.
        self._chunk = self._chunk_call(1)
        self._lock = threading.Lock()
        self.steps = 0

    def reset(self) -> None:
        with self._lock:
            self._carry[:] = 0.0
            self.steps = 0

    @property
    def state(self) -> list[np.ndarray]:
        """Copies of the carries in layer order: (batch, units) arrays, h per GRU or SimpleRNN direction,
        h then c per LSTM direction (Keras's initial_state order), and one (batch, (kernel_size - 1) *
        dilation_rate, channels) array of last inputs per causal Conv1D. Assign such a list to restore them."""
        with self._lock:
            return self._split_carry()

    @state.setter
    def state(self, states) -> None:
        carry = fill_carry(states, self.batch, self._program)
        with self._lock:
            self._carry[:] = carry

    def _split_carry(self) -> list[np.ndarray]:
        states, offset = [], 0
        for size, shape in zip(self._program.carry_dims, self._program.carry_shapes):
            states.append(self._carry[:, offset:offset + size].reshape((self.batch,) + shape).copy())
            offset += size
        return states

    def step(self, x_t, out=None):
        """Feed one time step, x_t (batch, features) or (features,) for batch 1; return the output.

        Returns (batch, D), or (D,) when x_t was (features,): for a model whose last GRU returns
        only its last step, what ``predict`` returns for the sequence fed so far. Pass ``out`` to
        write the result into your own array instead of a new one.
        """
        x_t = as_array(x_t, "x_t")
        views = self._shapes.get(x_t.shape)
        if views is None or x_t.dtype.kind not in ACCEPTED_KINDS:
            raise InputError(f"x_t must be a numeric array of shape {sorted(self._shapes, key=len)}, "
                             f"got {x_t.dtype} {x_t.shape}")
        x_view, result = views
        if out is not None:
            check_out(out, result.shape)
        with self._lock:
            x_view[...] = x_t
            self._advance(self._x, self._out)
            self.steps += 1
            if out is None:
                return result.copy()
            out[...] = result
            return out

    def run(self, x, out=None):
        """Feed a chunk x (batch, time, features); return every step's output (batch, time, D).

        ``out``: a float32 (batch, time, D) array to write the outputs into (then returned); a call
        with ``out`` allocates nothing once a chunk this long has been seen.
        """
        x_shape, returned, kernel_shape, advance = self._chunk
        if type(x) is not np.ndarray or x.dtype is not FLOAT32 or x.shape != x_shape or not x.flags.c_contiguous:
            x = as_input(x, self.model.input_features, self._program.check_size)
            if x.shape[0] != self.batch:
                raise InputError(f"this stream has batch {self.batch}; the chunk has batch {x.shape[0]}")
            if x.shape != x_shape:
                self._chunk = self._chunk_call(x.shape[1])
                x_shape, returned, kernel_shape, advance = self._chunk
        if out is None:
            out = np.empty(returned, FLOAT32)
        else:
            check_out(out, returned)
        with self._lock:
            advance(x, out.reshape(kernel_shape))
            self.steps += x_shape[1]
        return out

    def _chunk_call(self, steps: int) -> tuple:
        """``self._chunk`` for chunks of ``steps``, with scratch grown to them if need be (``workspace``
        checks the size; a stream has no 'valid' window that a shorter chunk could fall below)."""
        program = self._program
        grown, work = self._chunk_work
        if steps > grown:
            work = program.workspace(self.batch, steps, self._parallel)
            self._chunk_work = (steps, work)
        return ((self.batch, steps, self.model.input_features), program.returned_shape(self.batch, steps),
                program.output_shape(self.batch, steps), program.bind(self._carry, work))
