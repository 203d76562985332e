"""Layout glue of an ONNX graph: transposes, reshapes, squeezes, picking a direction or a time step."""

from __future__ import annotations

import dataclasses

import numpy as np

from .onnx_values import (BATCH, DIRECTION, FEATURE, ONE, SLICE_BEFORE_START, SLICE_END, TIME, _Chain, _Const,
                          _describe, _match_reshape, _Recurrent, _Shape, _StateInput, _Zeros)


class GlueOps:
    """``_op_<Type>`` handlers of the reader for operators that move data around."""

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
        if isinstance(value, _StateInput):
            return _StateInput(tuple(axes), value.sources)
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
            return _StateInput((DIRECTION, BATCH, FEATURE), value.sources)
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
        if isinstance(value, _Shape) and self.ints(target, "the target shape") in ([-1], [len(value.dims)]):
            return _Shape(value.dims)
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
        if isinstance(value, _Recurrent) and len(value.directions) == 1:  # one direction: a size-1 axis
            axes = [ONE if a == DIRECTION else a for a in axes]
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
        return tuple(dataclasses.replace(value, directions=(direction,), axes=axes) for direction in value.directions)

    def _pick_direction(self, value, index: int, keep: bool):
        count = len(value.directions) if isinstance(value, _Recurrent) else value.directions
        if not -count <= index < count:
            self.malformed(f"direction index {index} is out of range for {count} directions")
        axes = value.axes if keep else tuple(a for a in value.axes if a != DIRECTION)
        if isinstance(value, _StateInput):
            if not keep:
                self.fail("initial states must keep their direction axis")
            return _StateInput(axes, value.sources[index:index + 1 or None])
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
        if isinstance(value, _Shape):  # shape arithmetic, as PyTorch's dynamo exporter writes it
            starts, ends, axes, steps = (self.attribute_or_input(operands, i, name, attributes)
                                         for i, name in enumerate(("starts", "ends", "axes", "steps"), 1))
            if len(starts) != 1 or (axes or [0]) not in ([0], [-1]) or (steps or [1]) != [1]:
                self.fail("slices a shape vector other than by a plain [start:end]")
            return _Shape(value.dims[starts[0]:ends[0]])
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
                value = _StateInput(value.axes, value.sources[start:end])
            else:
                self.fail(f"slices [{start}:{end}:{step}] of the {label} axis")
        return value

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
