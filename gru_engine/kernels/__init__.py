"""Numba kernels: plain arrays and ints in, results written into arrays the caller allocated.

The kernels know nothing of layers or files. One module per concern:

- ``activations``: the activation functions, in place on a row.
- ``products``:    row-times-matrix products shared by every layer family.
- ``recurrent``:   what recurrent families share (the direction block, masked outputs, carries,
                   Bidirectional's merge).
- ``gru``, ``lstm``, ``simple_rnn``: one module per recurrent family.
- ``transforms``:  a bundle's input/output transform steps that are not folded into the weights.
- ``plan``:        the plan layout and the calls that run a whole model.
"""
