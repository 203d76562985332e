"""Conv1D's two ways to run (gru_engine.kernels.conv): whole windows as one product, as rows or as dot
products, and per-tap products for groups and dilation; against the NumPy reference, no TensorFlow.

Each case names the kernel layout it must run in, so a change of ``kernel_layout`` cannot quietly leave
a path untested. Edge windows get their own cases: 'same' windows longer than the input (cut on both
sides), windows with no row fully inside, strides that skip the last rows, and a stream whose chunks
are shorter than its history.
"""

from __future__ import annotations

import numpy as np
import pytest

import gru_engine
from gru_engine import bundle
from gru_engine.kernels import conv
from gru_engine.runtime import Model
from gru_engine.spec import Layer
from models import random_input
from reference import gru_config, random_spec, reference_predict
from test_conv import assert_close

WINDOWS, DOTS, TAPS = conv.LAYOUT_WINDOWS, conv.LAYOUT_DOTS, conv.LAYOUT_TAPS


def _config(filters, kernel_size, padding, strides=1, dilation_rate=1, groups=1, activation="tanh"):
    return {"filters": filters, "kernel_size": kernel_size, "strides": strides, "padding": padding,
            "dilation_rate": dilation_rate, "groups": groups, "activation": activation, "use_bias": True}


# name -> (Conv1D config, input channels, time steps, the layout it runs in)
CASES = {
    "guitar-first": (_config(16, 12, "same", strides=4, activation="linear"), 1, 30, WINDOWS),
    "guitar-second": (_config(16, 12, "same", strides=3, activation="linear"), 16, 30, DOTS),
    "rows-same-s1": (_config(5, 3, "same"), 2, 9, WINDOWS),
    "rows-valid-s3": (_config(4, 5, "valid", strides=3), 3, 16, WINDOWS),
    "rows-causal-s2": (_config(3, 4, "causal", strides=2), 2, 11, WINDOWS),
    "rows-same-longer-than-input": (_config(4, 7, "same", strides=2), 1, 3, WINDOWS),
    "dots-same-s2": (_config(6, 5, "same", strides=2), 4, 17, DOTS),
    "dots-valid-s4-skips-last-rows": (_config(3, 3, "valid", strides=4), 7, 18, DOTS),
    "dots-causal-s3": (_config(5, 6, "causal", strides=3), 3, 14, DOTS),
    "dots-same-longer-than-input": (_config(4, 9, "same"), 3, 4, DOTS),
    "dots-same-no-row-inside": (_config(2, 6, "same", strides=5), 4, 7, DOTS),
    "taps-dilation": (_config(4, 3, "causal", dilation_rate=2), 4, 12, TAPS),
    "taps-groups": (_config(4, 3, "same", groups=2), 4, 13, TAPS),
    "taps-groups-strides": (_config(6, 4, "valid", strides=2, groups=3), 6, 15, TAPS),
}


def _spec(layers, features, **options):
    """Conv1D layers, then a GRU returning every step (a model needs a recurrent layer)."""
    return random_spec([Layer("conv1d", f"conv1d_{index}", config) for index, config in enumerate(layers)]
                       + [Layer("gru", "gru", gru_config(5, return_sequences=True))], features, **options)


@pytest.mark.parametrize("name", list(CASES))
def test_each_layout_and_edge_window_matches_the_reference(name):
    config, channels, steps, layout = CASES[name]
    assert conv.kernel_layout(config["groups"], config["dilation_rate"], config["kernel_size"], channels) == layout
    spec = _spec([config], channels, check_shape=(2, steps))
    model = Model(spec)
    # Six samples: a block of four sharing each kernel load across samples, then a block of two.
    for batch in (1, 6):
        x = random_input(batch, steps, channels, seed=steps + batch)
        assert_close([model.predict(x)], reference_predict(spec, x), f"{name}, batch {batch}")


# Causal stride-1 layers in every layout, each keeping history: a 6-float window (rows), a 20-float one
# (dot products), a dilated one (taps).
STREAMED = [_config(4, 3, "causal"), _config(4, 5, "causal"), _config(3, 2, "causal", dilation_rate=3)]


def test_streamed_windows_in_every_layout_match_predict_across_chunks_and_restore(tmp_path):
    assert [conv.kernel_layout(c["groups"], c["dilation_rate"], c["kernel_size"], channels)
            for c, channels in zip(STREAMED, (2, 4, 4))] == [WINDOWS, DOTS, TAPS]
    spec = _spec(STREAMED, 2, check_shape=(2, 9))
    model = gru_engine.load(bundle.save(spec, tmp_path / "windows.gru.safetensors"))
    x = random_input(5, 19, 2, seed=11)
    expected = model.predict(x)
    stream = model.stream(batch=5)
    # Chunks shorter and longer than each layer's history: the first rows' windows read the kept rows.
    chunks = [x[:, a:b] for a, b in ((0, 1), (1, 3), (3, 4), (4, 9), (9, 12), (12, 19))]
    outputs = [stream.run(chunks[0]), stream.run(chunks[1]), stream.run(chunks[2])]
    saved = stream.state
    outputs += [stream.run(chunk) for chunk in chunks[3:]]
    assert_close([np.concatenate(outputs, axis=1)], [expected], "chunked stream vs predict")
    # The saved state, assigned to a new stream, goes on exactly as the first one went on.
    restored = model.stream(batch=5)
    restored.state = saved
    for chunk, output in zip(chunks[3:], outputs[3:]):
        np.testing.assert_array_equal(restored.run(chunk), output)
