"""``InferenceSession``: onnxruntime's interface over a bundle imported from an ONNX graph.

    import gru_engine
    session = gru_engine.InferenceSession("model.gru.safetensors")   # was onnxruntime.InferenceSession("model.onnx")
    y, y_h = session.run(None, {"X": x})

``run`` takes the graph's own inputs (X in its own layout, sequence_lens, initial_h) and returns
the graph's outputs, in its order and layouts, as onnxruntime does. It runs ``Model.predict``:
``sequence_lens`` becomes ``predict(lengths=...)``, initial_h slices its ``initial_state``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from . import bundle
from .errors import BundleError, InputError
from .interface import BATCH, DIRECTION, FEATURE, TIME, canonical, constants, graph_output
from .runtime import Model, as_array

# What onnxruntime demands of each input (it casts nothing).
ROLE_DTYPES = {"x": np.dtype(np.float32), "lengths": np.dtype(np.int32), "initial_h": np.dtype(np.float32)}
ONNX_TYPES = {"x": "tensor(float)", "lengths": "tensor(int32)", "initial_h": "tensor(float)"}


@dataclasses.dataclass(frozen=True)
class NodeArg:
    """An input or output of the graph, as onnxruntime describes it: dims are ints, or names/None
    when dynamic."""

    name: str
    shape: list
    type: str = "tensor(float)"


class InferenceSession:
    """onnxruntime's ``InferenceSession`` for a bundle written by ``import_onnx`` (or such a Model)."""

    def __init__(self, path_or_model, verify: bool = True):
        if isinstance(path_or_model, Model):
            model = path_or_model
        else:
            model = Model(bundle.read(path_or_model))
            if verify:
                bundle.self_check(model, Path(path_or_model))
        interface = model.spec.interface
        if interface is None:
            raise BundleError(f"{path_or_model}: this bundle records no ONNX graph interface (it was not written "
                              "by import_onnx); use gru_engine.load(path).predict(x) instead")
        self.model = model
        self._inputs = interface["inputs"]
        self._outputs = interface["outputs"]
        self._states, self._lengths = constants(interface)
        self._state_sources = interface["initial_state"]
        self._lengths_source = interface["lengths"]

    def get_inputs(self) -> list[NodeArg]:
        return [NodeArg(entry["name"], list(entry["shape"]), ONNX_TYPES[entry["role"]]) for entry in self._inputs]

    def get_outputs(self) -> list[NodeArg]:
        return [NodeArg(entry["name"], list(entry["shape"])) for entry in self._outputs]

    def get_providers(self) -> list[str]:
        return ["GruEngineCPU"]

    def run(self, output_names, input_feed, run_options=None) -> list[np.ndarray]:
        """The graph's outputs ``output_names`` (None: all, in graph order) for the feeds ``input_feed``."""
        by_name = {entry["name"]: index for index, entry in enumerate(self._outputs)}
        if output_names is None:
            wanted = list(range(len(self._outputs)))
        else:
            if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
                raise InputError(f"output_names must be a list of output names or None, got {output_names!r:.80}")
            unknown = [n for n in output_names if n not in by_name]
            if unknown:
                raise InputError(f"unknown output names {unknown}; this graph's outputs are {list(by_name)}")
            wanted = [by_name[n] for n in output_names]
        feeds = self._check_feeds(input_feed)
        x_entry = next(entry for entry in self._inputs if entry["role"] == "x")
        x = canonical(feeds[x_entry["name"]], x_entry["axes"], (BATCH, TIME, FEATURE))
        batch, steps = x.shape[0], x.shape[1]
        outputs, carries = self.model.predict_states(np.ascontiguousarray(x), self._initial_state(feeds, batch),
                                                     self._lengths_of(feeds, batch, steps))
        outputs = outputs if isinstance(outputs, list) else [outputs]
        return [graph_output(self._outputs[index], outputs + carries) for index in wanted]

    def _check_feeds(self, input_feed) -> dict[str, np.ndarray]:
        if not isinstance(input_feed, dict):
            raise InputError(f"input_feed must be a dict of input name -> array, got {type(input_feed).__name__}")
        names = [entry["name"] for entry in self._inputs]
        unknown = sorted(set(input_feed) - set(names), key=str)
        missing = [name for name in names if name not in input_feed]
        if unknown or missing:
            raise InputError(f"the feed has unknown inputs {unknown} and lacks {missing}; this graph's inputs are "
                             f"{names}")
        feeds, sizes = {}, {}
        for entry in self._inputs:
            name, role = entry["name"], entry["role"]
            array = as_array(input_feed[name], f"input '{name}'")
            want = ROLE_DTYPES[role]
            if array.dtype != want:
                raise InputError(f"input '{name}' has dtype {array.dtype}; the graph takes {want} "
                                 f"({ONNX_TYPES[role]}), as onnxruntime requires: cast it with .astype")
            if array.ndim != len(entry["shape"]) or any(
                    isinstance(d, int) and d != n for d, n in zip(entry["shape"], array.shape)) or 0 in array.shape:
                raise InputError(f"input '{name}' has shape {array.shape}; the graph takes {entry['shape']}")
            for axis, size in zip(entry["axes"], array.shape):
                if axis in (BATCH, TIME) and sizes.setdefault(axis, size) != size:
                    raise InputError(f"input '{name}' has {axis} size {size}, the other inputs {sizes[axis]}")
            feeds[name] = array
        return feeds

    def _initial_state(self, feeds, batch: int):
        if all(source is None for source in self._state_sources):
            return None
        dims = self.model.state_shapes
        states = []
        for source, constant, units in zip(self._state_sources, self._states, dims):
            if constant is not None:
                if constant.shape[0] != batch:
                    raise InputError(f"the graph's constant initial_h is for batch {constant.shape[0]}; "
                                     f"X has batch {batch}")
                states.append(constant)
            elif source is None:
                states.append(np.zeros((batch, units), np.float32))
            else:
                entry = next(entry for entry in self._inputs if entry["name"] == source["input"])
                if DIRECTION in entry["axes"]:
                    stacked = canonical(feeds[entry["name"]], entry["axes"], (DIRECTION, BATCH, FEATURE))
                    states.append(stacked[source["index"]])
                else:
                    states.append(canonical(feeds[entry["name"]], entry["axes"], (BATCH, FEATURE)))
        return states

    def _lengths_of(self, feeds, batch: int, steps: int):
        if self._lengths is not None:
            if self._lengths.shape[0] != batch:
                raise InputError(f"the graph's constant sequence_lens is for batch {self._lengths.shape[0]}; "
                                 f"X has batch {batch}")
            return self._lengths
        if self._lengths_source is None:
            return None
        return feeds[self._lengths_source["input"]]
