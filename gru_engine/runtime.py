"""The compiled runtime: ``Model`` and ``Stream``, over a ``program.Program``.

Everything a kernel reads is checked here first (Numba does no bounds checking): input rank,
feature count, dtype, sizes, state shapes. Finite values are checked inside the kernel, for speed.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from . import bundle, frontends, transforms
from .errors import InputError
from .program import FLOAT32, NO_LENGTHS, PARALLEL_MIN_BATCH, Program
from .spec import RECURRENT_FAMILIES, ModelSpec, output_shapes, stream_blockers, validate

# Numeric dtypes accepted and cast to float32.
ACCEPTED_KINDS = "fiub"
# A bound call (predict's per thread, a stream's per chunk length) before there is one: no array's
# shape equals None.
UNBOUND = (None, None, None)

KERAS_CLASS_NAMES = {"masking": "Masking", "bidirectional": "Bidirectional", "dense": "Dense",
                     **{kind: family.keras_class for kind, family in RECURRENT_FAMILIES.items()},
                     **frontends.KERAS_CLASS_NAMES}


def as_array(value, what: str) -> np.ndarray:
    """``value`` as a numpy array, or an InputError saying why it cannot be one (ragged lists...)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{what} cannot be read as a numeric array: {exc}") from None


def as_input(x, features: int, check_size=None) -> np.ndarray:
    """Check and coerce an input to an aligned, C-contiguous float32 (batch, time, features) array (``ready``).

    ``check_size(batch, time)`` runs before the cast, so a huge input is refused before it is copied.
    """
    if type(x) is np.ndarray and x.ndim == 3 and ready(x, x.shape):
        batch, steps, width = x.shape
        if width == features and batch and steps:
            return x  # the common case, checked in about 200 ns
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
    return np.require(x, np.float32, ("C_CONTIGUOUS", "ALIGNED"))


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


def fill_carry(states, batch: int, program: Program, carry=None) -> np.ndarray:
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


def ready(array, shape) -> bool:
    """Whether ``array`` can reach a kernel as it is: an aligned, C-contiguous float32 ndarray of
    ``shape`` (the bound calls read it as exactly that, unchecked)."""
    if type(array) is not np.ndarray or array.dtype is not FLOAT32 or array.shape != shape:
        return False
    flags = array.flags
    return flags.c_contiguous and flags.aligned


def writable(out, shape) -> bool:
    """Whether the kernel can write a result of ``shape`` into ``out`` as it is: ``ready``, and writable."""
    return type(out) is np.ndarray and out.dtype is FLOAT32 and out.shape == shape and out.flags.carray


def check_out(out, shape) -> None:
    """Refuse an ``out=`` array the kernel cannot write the result into as it is."""
    if not writable(out, shape):
        got = f"{out.dtype} {out.shape}" if isinstance(out, np.ndarray) else type(out).__name__
        raise InputError(f"out must be a writable C-contiguous float32 array of shape {shape}, got {got}")


def loads(data, verify: bool = True) -> "Model":
    """``gru_engine.load`` for a bundle held in memory (bytes, as ``bundle.to_bytes`` writes): how a
    pickled Model comes back."""
    model = Model(bundle.from_buffer(data))
    if verify:
        bundle.self_check(model)
    return model


class Model:
    """A model ready to run. Build it with ``gru_engine.load`` or ``Model(spec)``.

    ``fold_transforms=False`` runs every transform step in the compiled call instead of folding
    affine steps into the weights (to check that folding changes nothing beyond rounding).
    """

    def __init__(self, spec: ModelSpec, fold_transforms: bool = True):
        self.spec = spec
        self.shapes = validate(spec)
        self._fold = fold_transforms
        self._program = Program(spec, self.shapes, streaming=False, fold=fold_transforms)
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
        if initial_state is None and lengths is None:
            # A call shaped like the last one on this thread goes straight to the kernel call bound
            # then: the shapes were checked then, and the arrays are checked here.
            x_shape, returned, run = getattr(self._scratch, "bound", UNBOUND)
            if ready(x, x_shape) and (out is None or writable(out, returned)):
                result = np.empty(returned, FLOAT32) if out is None else out
                run(x, result)
                return result
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
            scratch.bound = UNBOUND
            scratch.key = key
        carry = scratch.carry
        # Bound for predict's next call of this shape; only where Numba's thread count cannot change
        # the kernel to call, and the output is one array.
        if initial_state is None and lengths is None and self._single_output and batch < PARALLEL_MIN_BATCH \
                and scratch.bound is UNBOUND:
            scratch.bound = (x.shape, scratch.returned_shape,
                             program.bind(carry, scratch.work, len(scratch.returned_shape), zero_carry=True))
        lengths = NO_LENGTHS if lengths is None else self._lengths(lengths, batch, steps)
        if out is not None:
            if not self._single_output:
                raise InputError("out= needs a model with one output; this one returns "
                                 f"{self.spec.output_count}")
            check_out(out, scratch.returned_shape)
            result = out
            out = out.reshape(scratch.output_shape)  # a view: (B, rows * D), the layout _outputs reads
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
        self._program = Program(model.spec, model.shapes, streaming=True, fold=model._fold)
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
        self._advance = self._program.bind(self._carry, self._work, self._out.ndim)
        # run's scratch as (steps, work): grown to the longest chunk so far, read and replaced as one
        # object, so a call never pairs a chunk with scratch made for a shorter one.
        self._chunk_work = (1, self._work)
        # The last chunk length's (x shape, returned shape, bound call), bound at the first chunk
        # (binding loads the compiled kernel): a chunk of that length, already aligned contiguous
        # float32, goes from run to the kernel without other checks.
        self._chunk = UNBOUND
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
        x_shape, returned, advance = self._chunk
        if not ready(x, x_shape):
            x = as_input(x, self.model.input_features, self._program.check_size)
            if x.shape[0] != self.batch:
                raise InputError(f"this stream has batch {self.batch}; the chunk has batch {x.shape[0]}")
            if x.shape != x_shape:
                self._chunk = self._chunk_call(x.shape[1])
                x_shape, returned, advance = self._chunk
        if out is None:
            out = np.empty(returned, FLOAT32)
        else:
            check_out(out, returned)
        with self._lock:
            advance(x, out)
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
        returned = program.returned_shape(self.batch, steps)
        return (self.batch, steps, self.model.input_features), returned, program.bind(self._carry, work, len(returned))
