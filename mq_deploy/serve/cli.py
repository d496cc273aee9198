"""`mq-deploy triton` and `mq-deploy serve`: flags mapped onto mq_deploy.serve (which does every check)."""

from __future__ import annotations


def register(sub) -> None:
    s = sub.add_parser("triton", help="write a Triton Inference Server model repository for ONNX exports / engines")
    s.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                   help="ONNX files from `mq-deploy export` (full or --decode-step), TensorRT engines from "
                        "`mq-deploy build` (with their --json report beside them) or those reports")
    s.add_argument("-o", "--output", required=True, metavar="REPO", help="the repository folder to write")
    s.add_argument("--name", help="model name (one artifact only; default: the file name)")
    s.add_argument("--max-batch", type=int, default=64, metavar="B",
                   help="max_batch_size with dynamic batching where the graph allows it (0: off)")
    s.add_argument("--instances", type=int, default=1, metavar="K", help="model instances (instance_group count)")
    s.add_argument("--backend", choices=["python", "onnxruntime", "tensorrt"],
                   help="default: onnxruntime for ONNX files, tensorrt for engines; python: Python-backend "
                        "models that run the ONNX in ONNX Runtime (the CPU path pytriton's server runs)")
    s.add_argument("--generate-step", choices=["inline", "bls"],
                   help="how NAME_generate runs a decode step: inline (default with --backend python) runs the "
                        "step graph in the generate model itself, the steps of all its generations batched into "
                        "one ONNX Runtime call; bls (default otherwise) sends each step to the step model")
    s.add_argument("--max-sequences", type=int, metavar="N",
                   help="live sequences per decode-step model instance, and generations NAME_generate runs at once "
                        "(as many more wait; beyond that a request is refused at once; default 64)")
    s.add_argument("--max-tokens-per-response", type=int, metavar="K",
                   help="NAME_generate sends the tokens a stream made since its last response in one response, "
                        "at most K (a stream K tokens ahead of its responses waits for them; 1: a response per "
                        "token; default 64)")
    s.add_argument("--response-interval-us", type=int, metavar="US",
                   help="how long a stream's token may wait for more to share its response (default 10000: a "
                        "response per stream every 10 ms while its tokens come faster than that; 0: none waits)")
    s.add_argument("--response-streams", type=int, metavar="N",
                   help="the interval holds for up to N streams waiting; with more, it grows in proportion, so that "
                        "all streams together send about N responses per interval (default 16)")
    s.add_argument("--threads", type=int, metavar="N",
                   help="ONNX Runtime intra-op threads of each Python-backend model (default 0: ONNX Runtime's own, "
                        "one per physical core; 1 leaves the other cores to the server and its clients, which pays "
                        "for small models)")
    s.add_argument("--custom-op-lib", metavar="SO", help="the native mq::SelectiveScan ONNX Runtime library")
    s.add_argument("--labels", metavar="TXT", help="Vim class names, one per line (default: 0..N-1)")
    s.add_argument("--overwrite", action="store_true", help="replace a repository mq-deploy wrote")
    s.set_defaults(func=cmd_triton)

    s = sub.add_parser("serve", help="run tritonserver on a model repository (loopback by default)")
    s.add_argument("repo", metavar="REPO", nargs="?")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics there (default off)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    s.add_argument("--setup", action="store_true",
                   help="first install what is missing: tritonclient, pytriton's tritonserver (--no-deps) and the "
                        "packages its Python-backend stub imports (apt as root, pip); idempotent")
    s.set_defaults(func=cmd_serve)


def cmd_triton(args) -> int:
    from mq_deploy.serve.repository import TritonConfig, write_repository

    cfg = TritonConfig(name=args.name, max_batch=args.max_batch, instances=args.instances, backend=args.backend,
                       custom_op_lib=args.custom_op_lib, labels=args.labels, overwrite=args.overwrite,
                       generate_step=args.generate_step,
                       **{k: getattr(args, k) for k in ("max_sequences", "max_tokens_per_response",
                                                        "response_interval_us", "response_streams", "threads")
                          if getattr(args, k) is not None})
    res = write_repository(args.artifacts, args.output, cfg)
    print(f"wrote {res['path']}: {len(res['models'])} models")
    for m in res["models"]:
        print(f"  {m['name']:<28} {m['backend']:<24} {m['what']}")
    print(f"start it: mq-deploy serve {args.output}   (other servers: {args.output}/README.md)")
    return 0


def cmd_serve(args) -> int:
    from mq_deploy.errors import MQUserError

    if args.setup:
        from mq_deploy.serve.install import setup

        setup()
        if args.repo is None:
            return 0
    elif args.repo is None:
        raise MQUserError("give the model repository to serve (REPO), or --setup to install the server")
    from mq_deploy.serve.server import serve

    return serve(args.repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                 metrics_port=args.metrics_port)
