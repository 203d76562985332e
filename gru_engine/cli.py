"""The ``gru-engine`` command. TensorFlow, onnx and onnxruntime are imported only by the verbs that need them."""

from __future__ import annotations

import argparse
import csv
import os
import sys

import numpy as np

from . import __version__

EPILOG_EXPORT = "example: gru-engine export model.keras --bundle model.gru.safetensors --onnx model.onnx"
EPILOG_PREDICT = "example: gru-engine predict model.gru.safetensors --input x.npy --output y.npy"
EPILOG_INSPECT = "example: gru-engine inspect model.gru.safetensors"
EPILOG_IMPORT = "example: gru-engine import model.onnx --bundle model.gru.safetensors"
EPILOG_EXPORT_C = "example: gru-engine export-c model.gru.safetensors --out c-model --name airline --weights int8"
EPILOG_SCORE = ("examples: gru-engine score model.gru.safetensors --input windows.zarr --output scores.zarr | "
                "gru-engine score model.gru.safetensors --input events.parquet --output scores.parquet "
                "--keep-columns --scheduler tcp://scheduler:8786")
EPILOG_VERIFY = "example: gru-engine verify model.keras --bundle model.gru.safetensors --onnx model.onnx"


class CommandError(Exception):
    """A usage problem found by a verb; printed as one line."""


def _export(args) -> None:
    if not args.bundle and not args.onnx:
        raise CommandError("say what to write: --bundle OUT.gru.safetensors and/or --onnx OUT.onnx")
    from .exporters import keras_reader

    model = keras_reader.load_keras(args.model)
    # ONNX first: it refuses more (Masking, for the native graph), and then nothing is written.
    if args.onnx:
        from .exporters import export_onnx
        path = export_onnx(model, args.onnx, method=args.onnx_method, opset=args.opset)
        print(f"wrote {path} ({args.onnx_method})")
    if args.bundle:
        path = keras_reader.export_bundle(model, args.bundle)
        print(f"wrote {path}")


def _export_c(args) -> None:
    from .exporters import export_c
    result = export_c(args.model, args.out, name=args.name, weights=args.weights)
    print(result.summary())


def _import(args) -> None:
    from .exporters import import_onnx
    path = import_onnx(args.model, args.bundle)
    print(f"wrote {path}")


def _load(args):
    from . import load
    return load(args.bundle, verify=not args.no_verify)


def _predict(args) -> None:
    from .fileio import check_output_path, read_array, save_array
    if args.stream and args.output:
        raise CommandError("--stream prints one line per input row; it writes no --output file")
    if args.output:
        check_output_path(args.output)  # before the model runs, not after
    model = _load(args)
    if args.stream:
        _predict_stream(model, args.input)
        return
    if args.input is None:
        raise CommandError("give --input X.npy (batch, time, features) or X.csv (time, features)")
    x = read_array(args.input)
    if args.input.endswith(".csv"):
        x = x[None]  # one sequence of (time, features)
    outputs = model.predict(x)
    y = outputs[0] if isinstance(outputs, list) else outputs
    if args.output:
        path = save_array(args.output, y)
        print(f"wrote {path} shape {y.shape}")
    else:
        np.savetxt(sys.stdout, y.reshape(-1, y.shape[-1]), delimiter=",", fmt="%.7g")


def _predict_stream(model, source) -> None:
    """One output line per input row, written as soon as the row arrives."""
    from .fileio import is_header, parse_csv_row

    stream = model.stream()
    handle = sys.stdin if source in (None, "-") else open(source, newline="")
    try:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or (number == 1 and is_header(row)):
                continue
            values = parse_csv_row(row, f"row {number}")
            y = stream.step(np.asarray(values, np.float32))
            print(",".join(f"{v:.7g}" for v in np.ravel(y)), flush=True)
    finally:
        if handle is not sys.stdin:
            handle.close()


def _shape(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give two positive ints, time steps and features: T,F")
    return values


def _score(args) -> None:
    from .score import score
    result = score(args.bundle, args.input, args.output, scheduler=args.scheduler, workers=args.workers,
                   rows_per_chunk=args.rows_per_chunk, batch=args.batch, overwrite=args.overwrite,
                   shape=args.shape, column=args.column, keep_columns=args.keep_columns,
                   progress=sys.stdout.isatty())
    print(result.summary())


def _inspect(args) -> None:
    from . import bundle
    from .runtime import Model
    spec = bundle.read(args.bundle)
    model = Model(spec)
    version = 1 if spec.interface is None else bundle.FORMAT_VERSION
    print(f"{args.bundle}: gru-engine bundle, format version {version}")
    model.summary()
    if spec.source.get("producer"):
        print(f"Producer: {spec.source['producer']}")
    for index, layer in enumerate(spec.layers):
        options = ", ".join(f"{k}={v}" for k, v in layer.config.items() if not isinstance(v, dict))
        print(f"  layer {index} {layer.name} [{layer.kind}] {options}")
        for name, array in layer.weights.items():
            print(f"      {name}: {tuple(array.shape)} float32")
    if spec.transforms:
        print("transforms: " + "; ".join(step["kind"] for step in spec.transforms))
    if spec.interface is not None:
        for entry in spec.interface["inputs"]:
            print(f"graph input  {entry['name']} ({entry['role']}): {entry['shape']} ({', '.join(entry['axes'])})")
        for entry in spec.interface["outputs"]:
            print(f"graph output {entry['name']}: {entry['shape']} ({', '.join(entry['axes'])})")
    check = spec.self_check_input
    print(f"self-check: {'input ' + str(tuple(check.shape)) if check is not None else 'none'}")


def _verify(args) -> int:
    from .exporters.verify import verify
    return verify(args.model, bundle_path=args.bundle, onnx_path=args.onnx)


def _bench(args) -> int:
    from .bench.runner import main as bench_main
    return bench_main(args.rest)


def _demo(args) -> int:
    from .demo import main as demo_main
    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gru-engine",
        description="Run Keras GRU models on the CPU: export to a self-checking bundle or ONNX, predict, "
                    "stream, score large data sets on Dask, benchmark.",
        epilog="example: gru-engine demo   (the airline forecaster end to end)")
    parser.add_argument("--version", action="version", version=f"gru-engine {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    export = verbs.add_parser("export", help="Keras model -> bundle and/or ONNX", epilog=EPILOG_EXPORT)
    export.add_argument("model", help="a .keras or .h5 model file")
    export.add_argument("--bundle", help="write a weight bundle here (.gru.safetensors)")
    export.add_argument("--onnx", help="write an ONNX graph here (.onnx)")
    export.add_argument("--onnx-method", choices=["native", "tf2onnx"], default="native",
                        help="native ONNX GRU operators (default, fast) or the tf2onnx converter")
    export.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    export.set_defaults(run=_export)

    export_c = verbs.add_parser("export-c", help="model -> dependency-free C99 (NAME.h, NAME.c)",
                                epilog=EPILOG_EXPORT_C)
    export_c.add_argument("model", help="a bundle (.gru.safetensors), a .keras/.h5 model or an .onnx graph")
    export_c.add_argument("--out", required=True, help="directory for NAME.h and NAME.c (created if missing)")
    export_c.add_argument("--name", default="model", help="C prefix of every symbol and the files' name (default model)")
    export_c.add_argument("--weights", choices=["float32", "int8"], default="float32",
                          help="float32 (default), or int8 with a float scale per column (about 4x smaller)")
    export_c.set_defaults(run=_export_c)

    predict = verbs.add_parser("predict", help="run a bundle on an input file", epilog=EPILOG_PREDICT)
    predict.add_argument("bundle", help="a .gru.safetensors bundle")
    predict.add_argument("--input", help="X.npy (batch, time, features) or X.csv (time, features); "
                                         "with --stream, a CSV file or - for stdin")
    predict.add_argument("--output", help="write Y.npy or Y.csv (default: print CSV)")
    predict.add_argument("--stream", action="store_true",
                         help="treat each CSV row as one time step; print one output line per row as it arrives")
    predict.add_argument("--no-verify", action="store_true", help="skip the bundle's self-check")
    predict.set_defaults(run=_predict)

    score = verbs.add_parser("score", help="score a data set of any size on Dask (needs the dask extra)",
                             epilog=EPILOG_SCORE)
    score.add_argument("bundle", help="a .gru.safetensors bundle")
    score.add_argument("--input", required=True, help="sequences (batch, time, features): X.npy, a Zarr array "
                                                      "(.zarr) or Parquet (a .parquet file or directory)")
    score.add_argument("--output", required=True, help="Y.npy, Y.zarr or Y.parquet (a directory of parts): the "
                                                       "main output, row for row")
    score.add_argument("--scheduler", help="tcp://HOST:8786 to use an existing Dask cluster, or 'synchronous' to run "
                                           "in this process (default: a local cluster, one worker per core)")
    score.add_argument("--workers", type=int, help="worker processes of the local cluster (default: one per core)")
    score.add_argument("--rows-per-chunk", type=int,
                       help="rows per task and per output part (default: about 32 MiB of input, at least 4 "
                            "chunks per worker)")
    score.add_argument("--batch", type=int, help="rows per model call inside a chunk (default 65536)")
    score.add_argument("--overwrite", action="store_true", help="replace an existing output")
    score.add_argument("--shape", type=_shape, help="T,F: time steps and features per Parquet row, when the "
                                                    "file's metadata does not say")
    score.add_argument("--column", help="the Parquet column holding the sequences (default: the only list column)")
    score.add_argument("--keep-columns", action="store_true",
                       help="copy the input's other Parquet columns (an id, say) into the output")
    score.set_defaults(run=_score)

    inspect = verbs.add_parser("inspect", help="print a bundle's manifest", epilog=EPILOG_INSPECT)
    inspect.add_argument("bundle")
    inspect.set_defaults(run=_inspect)

    onnx_import = verbs.add_parser("import", help="ONNX graph of GRU nodes -> bundle", epilog=EPILOG_IMPORT)
    onnx_import.add_argument("model", help="an .onnx file")
    onnx_import.add_argument("--bundle", required=True, help="write the bundle here")
    onnx_import.set_defaults(run=_import)

    verify = verbs.add_parser("verify", help="compare Keras, bundle and ONNX on random inputs", epilog=EPILOG_VERIFY)
    verify.add_argument("model", help="a .keras or .h5 model file")
    verify.add_argument("--bundle")
    verify.add_argument("--onnx")
    verify.set_defaults(run=_verify)

    for name, run, text in (("bench", _bench, "side-by-side benchmarks (gru-engine bench --help)"),
                            ("demo", _demo, "the airline forecaster end to end (gru-engine demo --help)")):
        verb = verbs.add_parser(name, help=text, add_help=False)
        verb.add_argument("rest", nargs=argparse.REMAINDER)
        verb.set_defaults(run=run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] in (["bench"], ["demo"]):
        # These verbs have parsers of their own; argparse.REMAINDER would drop options given first.
        args = parser.parse_args(argv[:1])
        args.rest = argv[1:]
    else:
        args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        status = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # one readable line, not a traceback (GRU_ENGINE_DEBUG=1 for the traceback)
        if os.environ.get("GRU_ENGINE_DEBUG"):
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"gru-engine {args.verb}: error: {message}", file=sys.stderr)
        return 1
    return int(status or 0)


if __name__ == "__main__":
    sys.exit(main())
