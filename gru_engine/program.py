"""A validated ``ModelSpec`` packed into one plan and one weight buffer, and the compiled call on them.

Every layer's tensors are laid out as the kernels read them (gate columns padded to the vector
width, LSTM gates reordered, transforms folded or turned into plan steps); ``Program.run`` is the
one place a kernel is called from, with scratch sized and checked here.
"""

from __future__ import annotations

import functools
import threading

import numba
import numpy as np

from . import folding, frontends
from .errors import InputError
from .kernels import activations, conv, lstm, plan, products, recurrent
from .kernels.transforms import S_FIRST, S_SECOND, S_SLOT, S_WIDTH
from .spec import RECURRENT_FAMILIES, ModelSpec, activation_parameters, output_shapes, recurrent_kind

# Below this batch size, waking Numba's thread pool costs more than it saves.
PARALLEL_MIN_BATCH = 8
# Scratch plus output per call is bounded, so a huge shape is an error, not an out-of-memory crash.
MAX_CALL_FLOATS = 1 << 31
FLOAT32 = np.dtype(np.float32)
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


def compiled(kernel, typed_like):
    """``kernel``'s compiled function for arguments of exactly the types of ``typed_like`` (loaded or
    compiled now), to be called without Numba's dispatcher: resolving the types of ten arguments
    costs it about 0.4 us per call. The function reads its arguments as those types, unchecked, so
    every caller passes arrays of the same dtype, dimensions and C layout."""
    return kernel.compile(tuple(numba.typeof(value) for value in typed_like))


class Program:
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
        """(rows, K): one block's scratch; in parallel, one per thread, reused for each block the
        thread claims, so that it stays in that core's cache."""
        rows = min(-(-batch // products.BLOCK), numba.get_num_threads()) if parallel else 1
        return rows, plan.workspace_size(min(batch, products.BLOCK), steps, self.max_dim, self.max_gate_width,
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

    def bind(self, carry, work, out_ndim, zero_carry=False):
        """``run`` from and into ``carry`` (or from zero state, with ``zero_carry``) on ``work`` as a
        call of (x, out) alone: a stream makes it every step or chunk, ``predict`` every call shaped
        like the last, and the Python between it and the kernel is most of a small call's overhead.

        x: (B, T, F) and out: (B, rows * D) or (B, rows, D), as ``out_ndim`` says; the caller checks
        that both are aligned, C-contiguous float32 arrays of the shapes this work was sized for
        (``runtime.ready`` and ``writable``).
        """
        if work.shape[0] != 1:
            # out as (B, rows * D), the form every other call passes: one compiled parallel kernel.
            return lambda x, out: self.run(x, carry, work, out.reshape((out.shape[0], -1)), zero_carry)
        max_dim, max_gate_width = self.max_dim, self.max_gate_width
        typed_like = (self.plan, self.weights, np.empty((1, 1, 1), np.float32), NO_LENGTHS, carry, work, max_dim,
                      max_gate_width, zero_carry, np.empty((1,) * out_ndim, np.float32))
        kernel = functools.partial(compiled(plan.run_batch, typed_like), self.plan, self.weights)

        def advance(x, out):
            bad = kernel(x, NO_LENGTHS, carry, work, max_dim, max_gate_width, zero_carry, out)
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
