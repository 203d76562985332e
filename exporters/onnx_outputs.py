"""The end of reading an ONNX graph: what its outputs are made of, as the model's layers (the last
recurrent layer's return_sequences and return_state set to match), and the interface records that
rebuild each graph output from what ``predict`` returns (``gru_engine.interface``)."""

from __future__ import annotations

from gru_engine.errors import BundleError, UnsupportedModelError
from gru_engine.spec import Layer

from .onnx_values import BATCH, DIRECTION, FEATURE, ONE, TIME, _is_sequence, _Recurrent, _States, carry_keys, state_keys


class OutputOps:
    """The reader's outputs: ``outputs`` once every node is read, then ``interface``."""

    def outputs(self) -> tuple[list[Layer], list[dict]]:
        """The model's layers, and how each graph output is built from what its ``predict`` returns."""
        graph = self.model.graph
        if not graph.output:
            raise BundleError(f"{self.path}: the graph has no output")
        values = [self.values.get(output.name) for output in graph.output]
        producers = {name: node for node in graph.node for name in node.output}
        self.node = producers.get(graph.output[0].name)
        if any(value is None for value in values):
            raise BundleError(f"{self.path}: a graph output is not computed by any node")
        if all(isinstance(value, _Recurrent) for value in values):
            layers, keys, records = self._recurrent_outputs(values)
        else:
            layers, keys, records = self._chain_outputs(values)
        for record, output in zip(records, graph.output):
            record["name"] = output.name
            dims = output.type.tensor_type.shape.dim
            record["shape"] = [_dim(d) for d in dims] if len(dims) == len(record["axes"]) else \
                [None] * len(record["axes"])
        self.carry_keys = [key for layer_keys in keys for key in layer_keys]
        return layers, records

    def _output_record(self, value, parts: list, core: tuple, reverse_time: bool) -> dict:
        stacked = (DIRECTION,) if DIRECTION in value.axes else ()
        if sorted(a for a in value.axes if a != ONE) != sorted(core + stacked):
            self.fail(f"a graph output has axes ({', '.join(value.axes)}); an output holds "
                      f"({', '.join(core + stacked)}) in any order")
        return {"parts": parts, "axes": list(value.axes), "reverse_time": reverse_time}

    def _recurrent_outputs(self, values):
        """Outputs that are all Y / Y_h (/ Y_c) of one recurrent node (or its directions), with no layer after it."""
        directions = {d.key: d for value in values for d in value.directions}
        if len({key[0] for key in directions}) != 1:
            self.fail("the graph returns the outputs of several GRU nodes; it may return one GRU's Y and Y_h, or a "
                      "chain of layers and the final states of its last GRU")
        ordered = [directions[key] for key in sorted(directions)]
        if all(v.carry for v in values):
            self.fail("it returns an LSTM's final cell state Y_c as data; a Keras model only returns it as a state, "
                      "after the LSTM's output")
        sequences = any(v.sequence for v in values)
        states = any(v.state for v in values)
        lasts = any(not v.sequence and not v.state for v in values)
        if lasts and (sequences or states):
            self.fail("the graph returns the last step of Y together with Y or Y_h")
        # Predict returns each direction's main output, then (return_state) each direction's final
        # carries (h, then c for an LSTM). Without a sequence, a direction's first Y_h is its main output
        # and a second one its state; Y_c is always a state.
        count, seen, all_parts = len(ordered), set(), []
        carries = len(carry_keys(ordered[0]))
        for value in values:
            parts = []
            for d in value.directions:
                index = sorted(directions).index(d.key)
                later = value.carry or (value.state if sequences else d.key in seen)
                parts.append(count + index * carries + value.carry if later else index)
                seen.add(d.key)
            all_parts.append(parts)
        return_state = any(part >= count for parts in all_parts for part in parts)
        config = {"return_sequences": sequences, "return_state": return_state,
                  "zero_output_for_mask": sequences or not states}
        first = ordered[0]
        if len(ordered) == 1:
            layer = Layer(first.kind, first.name, dict(first.config, **config), first.weights)
        else:
            layer = self._merge(*(_Recurrent((d,), (), sequences) for d in ordered), None).layers[-1]
            layer = Layer("bidirectional", layer.name, {
                **layer.config, "merge_mode": None, "forward": dict(layer.config["forward"], **config),
                "backward": dict(layer.config["backward"], **config)}, layer.weights)
        records = []
        for value, parts in zip(values, all_parts):
            reverse_time = False
            if value.sequence:
                flips = {d.flipped != (len(ordered) == 2 and d.key == ordered[1].key) for d in value.directions}
                if len(ordered) == 2 and flips != {False}:
                    self.fail("a bidirectional GRU's Y is returned reversed in time")
                reverse_time = len(ordered) == 1 and value.directions[0].flipped
            core = (BATCH, TIME, FEATURE) if value.sequence else (BATCH, FEATURE)
            records.append(self._output_record(value, parts, core, reverse_time))
        keys = first.source.keys + (sum((carry_keys(d) for d in ordered), ()),)
        return list(first.source.layers) + [layer], keys, records

    def _chain_outputs(self, values):
        """The first output is the model's (a chain of layers); the others final states of its last GRU."""
        chain = self.chain(values[0])
        if not chain.layers:
            self.fail("the graph returns its input unchanged")
        core = (BATCH, TIME, FEATURE) if _is_sequence(chain) else (BATCH, FEATURE)
        records = [self._output_record(chain, [0], core, chain.flipped)]
        extras = values[1:]
        returned = [key for v in extras if isinstance(v, _Recurrent) and v.state for key in state_keys(v)]
        if extras and all(isinstance(v, _Recurrent) and v.state for v in extras) and chain.layers[-1].kind != "dense" \
                and sorted(returned) == sorted(chain.origin):
            # Every final carry of the last layer: Keras's return_state.
            for value in extras:
                parts = [1 + chain.origin.index(key) for key in state_keys(value)]
                records.append(self._output_record(value, parts, (BATCH, FEATURE), False))
            return _finish_layers(chain.layers, len(extras)), chain.keys, records
        # Final states of any layers (PyTorch's h_n): the model's carries, after its one output.
        carries = [key for layer_keys in chain.keys for key in layer_keys]
        for value in extras:
            keys = value.keys if isinstance(value, _States) else state_keys(value) \
                if isinstance(value, _Recurrent) and value.state else ()
            if not keys or not all(key in carries for key in keys):
                self.fail("besides the model's output, a graph may only return final states (Y_h, an LSTM's Y_c) of "
                          "its recurrent layers")
            records.append(self._output_record(value, [1 + carries.index(key) for key in keys], (BATCH, FEATURE),
                                               False))
        return _finish_layers(chain.layers, 0), chain.keys, records

    def interface(self, records) -> dict:
        """The graph's inputs and outputs for ``gru_engine.InferenceSession``."""
        inputs = [{"name": self.main_input.name, "role": "x", "axes": list(self.input_axes),
                   "shape": [_dim(d) for d in self.main_input.type.tensor_type.shape.dim]}]
        initial = [self.initial_states.get(key) for key in self.carry_keys]
        used = {source["input"] for source in initial if source and "input" in source}
        for value in self.other_inputs:
            dims = [_dim(d) for d in value.type.tensor_type.shape.dim]
            if self.lengths == {"input": value.name}:
                inputs.append({"name": value.name, "role": "lengths", "axes": [BATCH], "shape": dims})
            elif value.name in used:
                default = (DIRECTION, BATCH, FEATURE) if len(dims) == 3 else (BATCH, FEATURE)
                inputs.append({"name": value.name, "role": "initial_h",
                               "axes": list(self.state_axes.get(value.name, default)), "shape": dims})
            else:
                raise UnsupportedModelError(f"{self.path}: input '{value.name}' feeds none of the graph's outputs "
                                            "as sequence_lens or initial_h")
        return {"inputs": inputs, "outputs": records, "initial_state": initial, "lengths": self.lengths}


def _dim(dim):
    """An ONNX dimension as onnxruntime reports it: its size, its name, or None."""
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    return dim.dim_param or None


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
