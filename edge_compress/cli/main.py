"""``edge-compress``: the command line. It parses arguments, builds configs and
calls library verbs; errors the user can fix print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_compress.errors import ConfigError, EdgeCompressError


def _add_data_synth(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic COCO-format detection dataset",
                       description="Write a synthetic COCO-format detection dataset (8+ shape/colour classes, "
                                   "1-12 objects per image, 8 px to half-image objects, occlusion, "
                                   "textured noisy backgrounds), fully determined by --seed.")
    p.add_argument("--out", required=True, type=Path, help="output directory (must not exist or be empty)")
    p.add_argument("--train", type=int, default=2000, help="number of training images (default 2000)")
    p.add_argument("--val", type=int, default=300, help="number of validation images (default 300)")
    p.add_argument("--size", type=int, default=320, help="image side in pixels (default 320)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    p.set_defaults(func=cmd_data_synth)


def cmd_data_synth(a) -> int:
    from edge_compress.data.synth import generate_synthetic

    paths = generate_synthetic(a.out, num_train=a.train, num_val=a.val, image_size=a.size, seed=a.seed,
                               overwrite=a.overwrite)
    print(f"wrote {a.train} train + {a.val} val images to {paths.root}")
    return 0


def cmd_zoo_list(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from edge_compress.models import list_detectors, zoo_entry

    t = Table("model", "family", "defaults", "description")
    for name in list_detectors(a.pattern):
        e = zoo_entry(name)
        t.add_row(name, e.family, ", ".join(f"{k}={v}" for k, v in e.defaults.items()), e.description)
    Console().print(t)
    return 0


def cmd_zoo_summary(a) -> int:
    from rich.console import Console
    from rich.table import Table

    from edge_compress.models import create_detector, summarize

    opts = {"input_size": a.input_size, "num_classes": a.num_classes}
    if a.width_mult is not None:
        opts["width_mult"] = a.width_mult
    model = create_detector(a.name, **opts)
    s = summarize(model)
    console = Console()
    if a.layers:
        t = Table("layer", "type", "output", "params", "MACs", "FLOPs")
        for r in s.layers:
            t.add_row(r.name, r.kind, "x".join(map(str, r.out_shape[1:])), f"{r.params:,}", f"{r.macs:,}",
                      f"{r.flops:,}")
        console.print(t)
    spec = model.input_spec
    console.print(f"[bold]{a.name}[/] ({model.family}): {s.params_m:.3f} M params, {s.macs / 1e9:.3f} GMACs, "
                  f"{s.gflops:.3f} GFLOPs at {spec.height}x{spec.width}, {model.num_classes} classes")
    console.print(f"input: {spec.layout} {spec.color} x{spec.scale:.5f} mean={spec.mean} std={spec.std}, "
                  f"letterbox pad {spec.pad_value}; strides {list(model.strides)}; "
                  f"head '{model.post.head}', {len(model.priors())} priors")
    if a.json:
        print(json.dumps({"model": a.name, "family": model.family, "params": s.params, "macs": s.macs,
                          "flops": s.flops, "input_spec": spec.to_dict(), "strides": list(model.strides)}))
    return 0


def _train_config(a):
    import yaml

    from edge_compress.train import TrainConfig

    base = {}
    if a.config:
        path = Path(a.config)
        if not path.is_file():
            raise EdgeCompressError(f"--config '{path}' does not exist")
        base = yaml.safe_load(path.read_text()) or {}
        if not isinstance(base, dict):
            raise EdgeCompressError(f"{path}: expected a mapping of training options")
    for key in ("epochs", "batch_size", "lr", "optimizer", "seed", "workers", "eval_every"):
        v = getattr(a, key)
        if v is not None:
            base[key] = v
    return TrainConfig.from_dict(base, source=str(a.config or "training options"))


def cmd_train(a) -> int:
    from edge_compress.eval.coco_eval import EvalResult, format_stats
    from edge_compress.pipeline import train_detector

    _threads(a)
    opts = {} if a.width_mult is None else {"width_mult": a.width_mult}
    out = a.out or Path("runs") / a.model
    _, result = train_detector(a.model, a.data, _train_config(a), out, input_size=a.input_size,
                               model_options=opts, resume=a.resume, progress=not a.no_progress)
    print(f"trained {a.model} for {result.epochs_run} epoch(s) in {result.train_s:.0f} s; checkpoints in {out}")
    if result.metrics:
        print("val: " + format_stats(EvalResult(**result.metrics)))
    return 0


def cmd_eval(a) -> int:
    from edge_compress.eval.coco_eval import format_stats
    from edge_compress.io import write_json_atomic

    _threads(a)
    if Path(a.checkpoint).is_dir():  # an artifact folder: mAP through its own runtime
        from edge_compress.export import evaluate_artifact

        r = evaluate_artifact(a.checkpoint, a.data, a.split, threads=a.threads or 1)
    else:
        from edge_compress.pipeline import evaluate_checkpoint

        r = evaluate_checkpoint(a.checkpoint, a.data, a.split)
    print(f"{a.checkpoint} on {a.data} [{a.split}, {r.num_images} images]: {format_stats(r)}")
    if a.json:
        write_json_atomic(a.json, r.to_dict())
    return 0


def _quant_config(a):
    """The int8 settings of `export`, or None for fp32 (any quant flag without --int8 is an error)."""
    from edge_compress.quant import QuantConfig

    given = {k: getattr(a, k) for k in ("calibrator", "calib_images", "percentile", "keep_fp32") if getattr(a, k)}
    if not a.int8:
        if given or a.quantize_outputs or a.per_tensor:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ConfigError(f"{flags or 'int8 options'} only apply to int8 exports: add --int8")
        return None
    d = {"calibrator": a.calibrator or "percentile", "keep_fp32": tuple(a.keep_fp32 or ()),
         "quantize_outputs": a.quantize_outputs, "per_channel": not a.per_tensor}
    if a.calib_images:
        d["num_images"] = a.calib_images
    if a.percentile:
        d["percentile"] = a.percentile
    return QuantConfig(**d)


def _external(a):
    """An ``ExternalDetector`` from the export flags of a user's ONNX file."""
    from edge_compress.external import DECODERS, load_external

    if not a.decoder or not a.classes or not a.input_size:
        raise ConfigError(f"exporting an ONNX file needs --decoder ({', '.join(DECODERS)}), --classes (a text file "
                          "with one name per line, or a comma-separated list) and --input-size")
    p = Path(a.classes)
    names = [n.strip() for n in (p.read_text().splitlines() if p.is_file() else a.classes.split(",")) if n.strip()]
    kw = {"strides": tuple(int(s) for s in a.strides.split(","))} if a.strides else {}
    return load_external(a.checkpoint, a.decoder, names, a.input_size, **kw)


def _lowering(a) -> dict | None:
    """--lower / --lower-layer as a LoweringConfig dict (kernels backend only; validated by export)."""
    if a.lower_default is None and not a.lower_layers:
        return None
    layers = {}
    for item in a.lower_layers or []:
        name, sep, choice = item.partition("=")
        if not sep or not name or not choice:
            raise ConfigError(f"--lower-layer '{item}' must be LAYER=CHOICE, e.g. backbone.stage3.conv1.conv=binary")
        layers[name] = choice
    from edge_compress.lower import LoweringConfig

    return LoweringConfig(default=a.lower_default or "fp32", layers=layers).to_dict()


def cmd_export(a) -> int:
    import warnings

    from edge_compress.eval.coco_eval import EvalResult, format_stats
    from edge_compress.export import INT8_MIN_SQNR_DB, Int8SlowerWarning, export_checkpoint

    _threads(a)
    quant = _quant_config(a)
    lowering = _lowering(a)
    if lowering and quant is None and "int8" in [lowering["default"], *lowering["layers"].values()]:
        raise ConfigError("int8 kernels need calibrated activation ranges: add --int8 (with --data, calibrated on "
                          "its train images), e.g. edge-compress export CKPT --backend kernels --int8 --data D --out DIR")
    min_sqnr = a.min_sqnr if a.min_sqnr is not None else INT8_MIN_SQNR_DB
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Int8SlowerWarning)  # printed below from the manifest
        if a.checkpoint.endswith(".onnx"):
            from edge_compress.export import export_model

            art = export_model(_external(a), a.backend, a.out, data=a.data, split=a.split, threads=a.threads or 1,
                               quant=quant, min_sqnr_db=min_sqnr, lowering=lowering)
        else:
            if a.decoder or a.classes:
                raise ConfigError("--decoder/--classes describe an external ONNX file; a checkpoint carries its own")
            art = export_checkpoint(a.checkpoint, a.backend, a.out, data=a.data, split=a.split,
                                    threads=a.threads or 1, quant=quant, min_sqnr_db=min_sqnr,
                                    lowering=lowering)
    m, v = art.manifest, art.manifest["validation"]
    check = (f"matches its reference: relative error {v['rel_error']:.2g} <= {v['tolerance']:g}" if "rel_error" in v
             else f"int8 SQNR {v['sqnr_db']:.1f} dB >= {v['min_sqnr_db']:g} dB")
    print(f"exported {a.checkpoint} for {art.backend} {m['backend']['runtime_version']} to {art.path} ({check})")
    if "runtime" in v:
        print(f"  checked with {v['runtime']}")
    lat = m["metrics"].get("latency_check")
    if lat:
        print(f"  int8 {lat['int8_p50_ms']:.2f} ms vs fp32 {lat['fp32_p50_ms']:.2f} ms p50 on this machine "
              f"({lat['threads']} thread(s)): x{lat['int8_speedup']:.2f}")
    for label, key in (("fp32", "map_fp32"), ("int8" if quant else "", "map")):
        r = m["metrics"].get(key)
        if r:
            stats = format_stats(EvalResult(**{k: x for k, x in r.items() if k != "split"}))
            print(f"mAP through the runtime{' (' + label + ')' if label else ''}: {stats}")
    for w in m.get("warnings", []):
        print(f"WARNING: {w}", file=sys.stderr)
    return 0


def cmd_run(a) -> int:
    from edge_compress.runtime import run_images

    written = run_images(a.artifact, a.images, a.out_dir, score_thresh=a.score_thresh, threads=a.threads or 1)
    print(f"wrote detections for {len(a.images)} image(s) to {a.out_dir} ({len(written)} files)")
    return 0


def cmd_demo(a) -> int:
    from edge_compress.demo import run_demo

    _threads(a)
    return run_demo(a.out, a.models, a.epochs, a.train_images, a.val_images, progress=not a.no_progress,
                    backends=[] if a.no_export else a.backends, fit_backend=None if a.no_fit else a.fit_backend)


def _threads(a) -> None:
    if getattr(a, "threads", None):
        import torch

        torch.set_num_threads(a.threads)


def _add_train_args(p) -> None:
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--optimizer", choices=["adamw", "sgd"])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default 0)")
    p.add_argument("--eval-every", dest="eval_every", type=int, help="evaluate every N epochs (0: at the end)")
    p.add_argument("--config", help="YAML file of training options (TrainConfig fields); flags override it")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-compress", description=(
        "Compress, export, profile and fit compact object detectors for edge devices."))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", help="the main job on the embedded default: generate data, train, evaluate")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    demo.add_argument("--models", nargs="+", default=["picodet_s"], help="zoo models to train (default picodet_s)")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--train-images", type=int, default=600)
    demo.add_argument("--val-images", type=int, default=150)
    demo.add_argument("--threads", type=int)
    demo.add_argument("--no-progress", action="store_true")
    demo.add_argument("--backends", nargs="+", default=["onnxruntime", "openvino"],
                      help="export each trained model for these backends at fp32 and int8 (default onnxruntime "
                           "openvino)")
    demo.add_argument("--no-export", dest="no_export", action="store_true", help="train and evaluate only")
    demo.add_argument("--fit-backend", dest="fit_backend", default="openvino",
                      help="backend of the demo's short fit (default openvino; one of --backends)")
    demo.add_argument("--no-fit", dest="no_fit", action="store_true", help="skip the short fit")
    demo.set_defaults(func=cmd_demo)

    data = verbs.add_parser("data", help="datasets").add_subparsers(dest="data_verb", required=True, metavar="VERB")
    _add_data_synth(data)

    zoo = verbs.add_parser("zoo", help="the detector zoo").add_subparsers(dest="zoo_verb", required=True,
                                                                           metavar="VERB")
    p = zoo.add_parser("list", help="list zoo detectors")
    p.add_argument("pattern", nargs="?", default="*", help="glob on model names, e.g. 'ssd*'")
    p.set_defaults(func=cmd_zoo_list)
    p = zoo.add_parser("summary", help="params, MACs and FLOPs per layer and in total")
    p.add_argument("name")
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--num-classes", type=int, default=80)
    p.add_argument("--width-mult", type=float)
    p.add_argument("--layers", action="store_true", help="print the per-layer table")
    p.add_argument("--json", action="store_true", help="also print one JSON line")
    p.set_defaults(func=cmd_zoo_summary)

    p = verbs.add_parser("train", help="train a zoo detector on a COCO-format dataset")
    p.add_argument("--model", required=True, help="zoo name (see `edge-compress zoo list`)")
    p.add_argument("--data", required=True, help="dataset directory or data YAML (see README)")
    p.add_argument("--out", type=Path, help="run directory (default runs/MODEL)")
    p.add_argument("--input-size", type=int, default=320)
    p.add_argument("--width-mult", type=float)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-progress", action="store_true")
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = verbs.add_parser("eval", help="COCO mAP of a checkpoint or an artifact (pycocotools)")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_ARTIFACT",
                   help="a .pt file written by `edge-compress train`, or an artifact directory "
                                      "written by `edge-compress export` (scored through its own runtime)")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["train", "val"])
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_eval)

    from edge_compress.backends import list_backends

    p = verbs.add_parser("export", help="a validated deployable artifact for one backend (fp32 or int8)")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_ONNX",
                   help="a .pt file written by `edge-compress train`, or a detector's .onnx file made elsewhere "
                        "(then give --decoder, --classes and --input-size)")
    p.add_argument("--backend", required=True, help=f"one of: {', '.join(list_backends())}")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to create (must not exist)")
    p.add_argument("--data", help="dataset: mAP through the runtime goes in the manifest; int8 calibrates on it")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split scored for mAP")
    p.add_argument("--threads", type=int, help="threads for torch and the runtime")
    e = p.add_argument_group("an external ONNX detector")
    e.add_argument("--decoder", choices=["yolo_af", "yolo", "gfl", "ssd", "raw"],
                   help="how its output decodes: yolo_af (YOLOv8/11), gfl (PicoDet), raw (x1,y1,x2,y2 + scores)")
    e.add_argument("--classes", help="class names: a text file, one per line, or a comma-separated list")
    e.add_argument("--input-size", dest="input_size", type=int, help="square input size the model expects")
    e.add_argument("--strides", help="comma-separated strides of its output levels (default 8,16,32)")
    q = p.add_argument_group("int8 post-training quantization")
    q.add_argument("--int8", action="store_true", help="int8 weights (per channel) and activations (per tensor)")
    q.add_argument("--calibrator", choices=["minmax", "percentile", "entropy", "mse"],
                   help="activation range calibrator (default percentile)")
    q.add_argument("--calib-images", dest="calib_images", type=int,
                   help="calibration images from the train split (default 64)")
    q.add_argument("--percentile", type=float, help="for --calibrator percentile (default 99.99)")
    q.add_argument("--keep-fp32", dest="keep_fp32", action="append", metavar="LAYER",
                   help="keep this layer in fp32 (a module name from `zoo summary NAME --layers` or an ONNX "
                        "node name); repeatable")
    q.add_argument("--quantize-outputs", dest="quantize_outputs", action="store_true",
                   help="quantize the head's output convs too (kept fp32 by default)")
    q.add_argument("--per-tensor", dest="per_tensor", action="store_true", help="per-tensor weight scales")
    q.add_argument("--min-sqnr", dest="min_sqnr", type=float, help="refuse the export below this head-output "
                   "SQNR in dB against fp32 (default 20)")
    k = p.add_argument_group("kernels backend: which of our kernels each conv runs on")
    k.add_argument("--lower", dest="lower_default", choices=["fp32", "int8", "binary", "sparse_csr", "sparse_2_4"],
                   help="every conv that can take it (binarised convs -> binary; convs at most half dense -> "
                        "sparse_csr; int8 needs --int8 for its calibration); the others stay fp32 and the manifest "
                        "says why")
    k.add_argument("--lower-layer", dest="lower_layers", action="append", metavar="LAYER=CHOICE",
                   help="one conv's kernel (module or ONNX node name); an impossible choice is an error; repeatable")
    p.set_defaults(func=cmd_export)

    p = verbs.add_parser("run", help="detect objects in images with an artifact (JSON + drawn boxes)")
    p.add_argument("artifact", help="an artifact directory written by `edge-compress export`")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--out-dir", dest="out_dir", type=Path, default=Path("detections"),
                   help="where <image stem>.json and <image stem>.png go (default ./detections)")
    p.add_argument("--score-thresh", dest="score_thresh", type=float, default=0.25)
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_run)

    from edge_compress.cli import agent_cmd, compress_cmd, fit_cmd, profile_cmd

    profile_cmd.add_parsers(verbs)   # profile, profiles list | show | compare
    agent_cmd.add_parsers(verbs)     # agent serve | token | oneshot
    compress_cmd.add_parsers(verbs)  # compress, sensitivity
    fit_cmd.add_parsers(verbs)       # fit
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgeCompressError as e:
        print(f"edge-compress: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-compress: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
