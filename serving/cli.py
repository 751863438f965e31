"""`matta serve`: the local TF-Serving-compatible model server (a development stand-in).

Flags follow `tensorflow_model_server`'s (model_servers/main.cc), so one command line serves on both:

    matta serve --port=8500 --rest_api_port=8501 --model_config_file=runs/serving/models.config \
        --allow_version_labels_for_unavailable_models=true \
        --enable_batching=true --batching_parameters_file=runs/serving/batching_parameters.txt
    matta serve --model_name=relevance --model_base_path=runs/serving/relevance

(replace `matta serve` by `tensorflow_model_server`). As there, REST is off unless
`--rest_api_port` is given, and a config with version labels needs
`--allow_version_labels_for_unavailable_models=true`.

`main(argv)` is also runnable as `python -m matta_tf.serving.cli serve ...`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Any

_SERVE_HELP = """\
Serves SavedModels exported by `serving.export_for_serving` (or any SavedModel with Predict
signatures) over TF Serving's gRPC PredictionService (Predict, GetModelMetadata) and REST API
(/v1/models/<name>[/versions/<N>|/labels/<label>][:predict|:classify|:regress|/metadata]), reading a TF Serving model
config file (versions, version policies, version labels). It is a local stand-in for development and
tests, not a replacement for TF Serving: no model polling, no MultiInference. It binds to 127.0.0.1
unless --host says otherwise. A SavedModel runs its own ops: serve only models you trust.
"""


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number; got {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port number is in [0, 65535]; got {port}")
    return port


def _flag(parser: argparse.ArgumentParser, name: str, default: bool, text: str) -> None:
    """A boolean flag as TensorFlow's flag parser reads it: `--name`, `--name=true` or `--name=false`."""
    parser.add_argument(f"--{name}", f"--{name.replace('_', '-')}", dest=name, type=_boolean, nargs="?", const=True,
                        default=default, help=f"{text} (default {str(default).lower()})")


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Adds the `serve` verb to an `argparse` sub-parser collection (used by `matta`)."""
    serve = subparsers.add_parser(
        "serve", help="local TF-Serving-compatible model server (development stand-in)", description=_SERVE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_config_file", "--model-config-file", dest="model_config_file",
                        help="TF Serving model config file (text ModelServerConfig)")
    source.add_argument("--model_base_path", "--model-base-path", dest="model_base_path",
                        help="serve the latest version under this folder (with --model_name)")
    serve.add_argument("--model_name", "--model-name", dest="model_name", default="default",
                       help="model name with --model_base_path (default: default)")
    serve.add_argument("--port", type=_port, default=8500, help="gRPC port, 1-65535 (default 8500)")
    serve.add_argument("--rest_api_port", "--rest-api-port", dest="rest_api_port", type=_port, default=0,
                       help="REST port; 0 disables REST (default 0, as TF Serving)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--max_workers", "--max-workers", dest="max_workers", type=int, default=8,
                       help="gRPC threads (default 8)")
    serve.add_argument("--rest_api_num_threads", "--rest-api-num-threads", dest="rest_api_num_threads", type=int,
                       default=256, help="REST connections served at once, one thread each (default 256)")
    _flag(serve, "enable_model_warmup", True, "replay assets.extra/tf_serving_warmup_requests at load")
    _flag(serve, "allow_version_labels_for_unavailable_models", False,
          "let version labels point at versions that are not loaded yet; a config with labels needs it")
    _flag(serve, "enable_batching", False, "batch concurrent requests (TF Serving's batching semantics)")
    serve.add_argument("--batching_parameters_file", "--batching-parameters-file", dest="batching_parameters_file",
                       default="", help="text BatchingParameters file (with --enable_batching)")
    return serve


def run_serve(args: argparse.Namespace) -> int:
    """Runs the server until SIGINT or SIGTERM."""
    if args.port < 1:
        raise ValueError(f"--port must be a port number in [1, 65535]. Received: --port={args.port}")
    if args.batching_parameters_file and not args.enable_batching:
        # model_servers/server.cc: "batching_parameters_file is set without setting enable_batching"
        raise ValueError("--batching_parameters_file is set without setting --enable_batching")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from tensorflow_serving.config import model_server_config_pb2

    from matta_tf.serving.model_config import BatchingParameters, absolute_path
    from matta_tf.serving.server import LocalModelServer

    batching = None
    if args.enable_batching:
        batching = (BatchingParameters.read(args.batching_parameters_file) if args.batching_parameters_file
                    else BatchingParameters(pad_variable_length_inputs=False))
    if args.model_config_file:
        config: Any = args.model_config_file
    else:
        config = model_server_config_pb2.ModelServerConfig()
        config.model_config_list.config.add(name=args.model_name, base_path=absolute_path(args.model_base_path),
                                            model_platform="tensorflow")
    server = LocalModelServer(
        config, grpc_port=args.port, rest_port=args.rest_api_port or None, host=args.host,
        max_workers=args.max_workers, max_connections=args.rest_api_num_threads,
        enable_warmup=args.enable_model_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        batching=batching,
    ).start()

    def stop(signum: int, frame: Any) -> None:
        server.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for name, model in server.registry.models.items():
        labels = ", ".join(f"{label}={version}" for label, version in sorted(model.labels.items())) or "none"
        print(f"model {name}: versions {sorted(model.versions)}, labels {labels}", flush=True)
    rest = f"{args.host}:{server.rest_port}" if server.rest_port else "off"
    print(f"serving gRPC on {args.host}:{server.grpc_port}, REST on {rest} (local stand-in for TF Serving)",
          flush=True)
    server.wait()
    return 0


def main(argv: list[str] | None = None) -> int:
    """`serve` verb entry point (`python -m matta_tf.serving.cli serve ...`)."""
    parser = argparse.ArgumentParser(prog="matta", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    add_serve_parser(subparsers)
    args = parser.parse_args(argv)
    from matta_tf.serving.model_config import ModelConfigError

    try:
        return run_serve(args)
    except (ModelConfigError, FileNotFoundError, ValueError, OSError) as error:
        print(f"matta {args.verb}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
