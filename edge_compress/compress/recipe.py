"""Recipes: an ordered list of compression steps applied to one detector (issue 5, item 6).

A recipe file (YAML) is::

    name: prune50_distill            # optional
    steps:
      - method: channel_pruning      # a name of METHODS below
        config: {ratio: 0.5}         # that method's config fields
        finetune: {epochs: 3, lr: 0.002}        # optional TrainConfig fields
        distill: {temperature: 2.0}             # optional DistillConfig fields (needs finetune)

Unknown keys are rejected at every level (file, step, config) with the file, the step
index and the key in the message. The order is checked before anything runs (see
:func:`check_order`). ``compress(model, recipe, data, out)`` applies the steps in order,
fine-tunes where asked (distilling from the uncompressed model by default), measures
params/MACs and COCO mAP after every step and fine-tune, and writes a compressed
checkpoint (``edge_compress.compress.checkpoint``) and a JSON report into ``out``, a new
directory made only when everything succeeded.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from edge_compress.compress.checkpoint import AppliedStep, save_compressed
from edge_compress.compress.distill import DistillConfig
from edge_compress.errors import ArtifactError, ConfigError, DataError, UnknownNameError
from edge_compress.io import write_json_atomic
from edge_compress.train.config import TrainConfig

STRUCTURAL, MASK, QUANT = "structural", "mask", "quant"


@dataclass(frozen=True)
class MethodEntry:
    """One compression method: where its config class, verb and ``restructure`` live (imported lazily),
    its survey ``family``, its ``kind`` for the ordering rules, and the config values its name fixes."""

    name: str
    family: str
    kind: str
    module: str
    config: str
    verb: str
    fixed: dict[str, Any] = field(default_factory=dict)

    def _module(self):
        try:
            return importlib.import_module(f"edge_compress.compress.{self.module}")
        except ModuleNotFoundError as e:
            raise ConfigError(f"compression method '{self.name}' needs edge_compress.compress.{self.module}, "
                              f"which is not available in this installation ({e})") from e

    def config_class(self) -> type:
        return getattr(self._module(), self.config)

    def verb_fn(self) -> Callable[..., Any]:
        return getattr(self._module(), self.verb)

    def restructure(self) -> Callable[[nn.Module, dict[str, Any]], None]:
        return getattr(self._module(), "restructure")

    def make_config(self, d: dict[str, Any] | None, source: str):
        """The frozen config from a mapping: the name's fixed values filled in, a contradiction rejected."""
        d = dict(d or {})
        for key, value in self.fixed.items():
            if key in d and d[key] != value:
                raise ConfigError(f"{source}: {key}={d[key]!r} contradicts method '{self.name}', which means "
                                  f"{key}={value!r}; drop the key or choose the matching method name")
            d[key] = value
        cls = self.config_class()
        try:
            return cls.from_dict(d)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{source}: {e}") from e


# The names the benchmark uses; modules appear as the methods land.
METHODS: dict[str, MethodEntry] = {e.name: e for e in (
    MethodEntry("channel_pruning", "pruning", STRUCTURAL, "structured", "ChannelPruneConfig", "prune_channels"),
    MethodEntry("layer_pruning", "pruning", STRUCTURAL, "layerdrop", "LayerDropConfig", "drop_layers"),
    MethodEntry("magnitude", "pruning", MASK, "sparsity", "SparsityConfig", "prune_unstructured",
                {"method": "magnitude"}),
    MethodEntry("lamp", "pruning", MASK, "sparsity", "SparsityConfig", "prune_unstructured",
                {"method": "lamp", "scope": "global"}),
    MethodEntry("nm_2_4", "pruning", MASK, "sparsity", "SparsityConfig", "prune_unstructured",
                {"method": "nm", "n": 2, "m": 4, "sparsity": 0.5}),
    MethodEntry("qat_int8", "quantization", QUANT, "qat", "QATConfig", "prepare_qat"),
    MethodEntry("binary", "quantization", QUANT, "binary", "BinaryConfig", "binarize"),
    MethodEntry("ternary", "quantization", QUANT, "ternary", "TernaryConfig", "ternarize"),
    MethodEntry("kmeans", "quantization", QUANT, "kmeans", "KMeansConfig", "cluster_weights"),
    MethodEntry("lowrank", "low-rank", STRUCTURAL, "lowrank", "LowRankConfig", "decompose"),
)}


def method_entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise UnknownNameError(f"unknown compression method '{name}'; choose one of: {', '.join(METHODS)}")
    return METHODS[name]


# ---- recipes ----

@dataclass(frozen=True)
class RecipeStep:
    method: str
    config: Any
    finetune: TrainConfig | None = None
    distill: DistillConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"method": self.method, "config": config_dict(self.config)}
        if self.finetune is not None:
            d["finetune"] = self.finetune.to_dict()
        if self.distill is not None:
            d["distill"] = self.distill.to_dict()
        return d


@dataclass(frozen=True)
class Recipe:
    steps: tuple[RecipeStep, ...]
    name: str = ""
    source: str = "recipe"

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError(f"{self.source}: the recipe has no steps; give a list under 'steps:'")
        check_order(self.steps, self.source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [s.to_dict() for s in self.steps]}

    @classmethod
    def from_dict(cls, d: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a mapping with 'steps:' (and optionally 'name:'), got "
                              f"{type(d).__name__}")
        _known(d, ("name", "steps"), source, "recipe key")
        steps = d.get("steps")
        if not isinstance(steps, list):
            raise ConfigError(f"{source}: 'steps' must be a list of {{method: ..., config: {{...}}}} entries")
        return cls(tuple(_step(s, f"{source}: step {i}") for i, s in enumerate(steps)),
                   str(d.get("name", "")), source)


def _known(d: dict[str, Any], known: tuple[str, ...], source: str, what: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown {what}(s) {unknown}; known {what}s: {list(known)}")


def _step(d: Any, source: str) -> RecipeStep:
    if not isinstance(d, dict) or "method" not in d:
        raise ConfigError(f"{source}: a step is a mapping with 'method:' (one of {', '.join(METHODS)}), got {d!r}")
    _known(d, ("method", "config", "finetune", "distill"), source, "step key")
    entry = method_entry(str(d["method"]))
    source = f"{source} ({entry.name})"
    config = entry.make_config(_mapping(d.get("config"), f"{source}: config"), f"{source}: config")
    finetune = distill = None
    if d.get("finetune") is not None:
        finetune = TrainConfig.from_dict(_mapping(d["finetune"], f"{source}: finetune"),
                                         source=f"{source}: finetune")
    if d.get("distill") is not None:
        if finetune is None:
            raise ConfigError(f"{source}: 'distill' needs a 'finetune' in the same step (distillation is a "
                              "loss term of the fine-tune)")
        distill = DistillConfig.from_dict(_mapping(d["distill"], f"{source}: distill"), source=f"{source}: distill")
    return RecipeStep(entry.name, config, finetune, distill)


def _mapping(d: Any, source: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping of fields, got {type(d).__name__} {d!r}")
    return d


def load_recipe(path: str | Path) -> Recipe:
    """A recipe from a YAML (or JSON) file; every error names the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe '{path}' does not exist; see recipes/ for examples")
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    return Recipe.from_dict(d, source=str(path))


def _layers(config: Any) -> frozenset[str] | None:
    """The layers a config names explicitly, or None for "the method's default set" (overlaps anything)."""
    layers = tuple(getattr(config, "layers", ()) or ())
    return frozenset(layers) if layers else None


def check_order(steps: tuple[RecipeStep, ...], source: str) -> None:
    """Reject impossible orders before anything runs:

    * nothing that changes the structure or prunes (channel/layer pruning, low-rank, masks)
      after a quantization step (qat_int8, binary, ternary, kmeans): the quantizers wrap and
      the clusters describe the layers as they were (k-means centroids would be broken by
      pruning, QAT scales and binary/ternary wrappers by slicing or replacing layers);
    * no structural step after unstructured masks: slicing or replacing a masked layer loses or
      misaligns its mask; prune structurally first, then mask;
    * no two quantization steps on the same layers (layers named explicitly and disjoint are fine).
    """
    quant_seen: list[tuple[int, RecipeStep]] = []
    mask_seen: tuple[int, RecipeStep] | None = None
    for i, step in enumerate(steps):
        kind = METHODS[step.method].kind
        if kind in (STRUCTURAL, MASK) and quant_seen:
            j, q = quant_seen[0]
            raise ConfigError(f"{source}: step {i} ({step.method}) comes after step {j} ({q.method}): "
                              f"{step.method} changes the weights {q.method} quantized/clustered; move "
                              f"{step.method} before {q.method}")
        if kind == STRUCTURAL and mask_seen is not None:
            j, m = mask_seen
            raise ConfigError(f"{source}: step {i} ({step.method}) comes after step {j} ({m.method}): it would "
                              f"drop or misalign the {m.method} masks; put structural steps before masks")
        if kind == QUANT:
            for j, q in quant_seen:
                a, b = _layers(q.config), _layers(step.config)
                if a is None or b is None or a & b:
                    both = "their default layer sets overlap" if a is None or b is None else sorted(a & b)
                    raise ConfigError(f"{source}: steps {j} ({q.method}) and {i} ({step.method}) both quantize "
                                      f"the same layers ({both}); give each explicit, disjoint 'layers'")
            quant_seen.append((i, step))
        if kind == MASK and mask_seen is None:
            mask_seen = (i, step)


def config_dict(config: Any) -> dict[str, Any]:
    """A config as JSON-able data (its ``to_dict`` when it has one)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dataclasses.asdict(config)
    return json.loads(json.dumps(d, default=list))


# ---- compress ----

@dataclass(frozen=True)
class StageRow:
    """Size and accuracy of the model after one stage (baseline, a step, or its fine-tune)."""

    stage: str
    params: int
    macs: int
    ap: float
    ap50: float
    params_nonzero: int = -1          # masked (pruned) weights not counted; -1: not measured

    @property
    def gflops(self) -> float:
        return 2 * self.macs / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "params": self.params, "params_m": self.params / 1e6,
                "params_nonzero": self.params_nonzero, "macs": self.macs, "gflops": self.gflops,
                "ap": self.ap, "ap50": self.ap50}


@dataclass
class CompressResult:
    out: Path
    model: nn.Module
    rows: list[StageRow]
    steps: list[AppliedStep]
    reports: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "rows": [r.to_dict() for r in self.rows],
                "steps": [s.to_dict() for s in self.steps], "reports": self.reports}


def measure(model: nn.Module, val_data, stage: str) -> StageRow:
    """Params (effective weights, ``effective_param_counts``: a clustered layer counts its weights, not
    its codebook) and nonzero params, MACs (``summarize``), COCO AP/AP50 on ``val_data``."""
    from edge_compress.compress.sparsity import effective_param_counts
    from edge_compress.eval.runner import evaluate_model
    from edge_compress.models.summary import summarize

    s = summarize(model)
    m = evaluate_model(model, val_data)
    params, nonzero = effective_param_counts(model)
    return StageRow(stage, params, s.macs, float(m.ap), float(m.ap50), nonzero)


def _data_args(verb: Callable[..., Any], config: Any, model: nn.Module, train_data, val_data) -> dict[str, Any]:
    """The data a verb asks for by parameter name: ``data``/``train_data`` (training split), ``val_data``,
    ``taylor_batches`` (a few training batches) when the config's criterion is 'taylor', and
    ``bn_batches`` (``config.recalibrate_bn`` training batches) for BatchNorm recalibration."""
    from edge_compress.compress.bn import BATCH_SIZE

    params = inspect.signature(verb).parameters
    offered = {"data": train_data, "train_data": train_data, "val_data": val_data}
    args = {k: v for k, v in offered.items() if k in params}
    if "taylor_batches" in params and getattr(config, "criterion", None) == "taylor":
        args["taylor_batches"] = training_batches(model, train_data)
    if "bn_batches" in params and getattr(config, "recalibrate_bn", 0):
        args["bn_batches"] = iter_training_batches(model, train_data, config.recalibrate_bn, BATCH_SIZE)
    return args


def training_batches(model: nn.Module, data, batches: int = 4, batch_size: int = 8) -> list[tuple[Any, list]]:
    """A few ``(normalised images, targets)`` batches of ``data`` in a fixed order (gradient criteria)."""
    return list(iter_training_batches(model, data, batches, batch_size))


def iter_training_batches(model: nn.Module, data, batches: int, batch_size: int) -> Iterator[tuple[Any, list]]:
    """``training_batches`` one at a time (BatchNorm recalibration reads many and keeps none)."""
    from torch.utils.data import DataLoader

    from edge_compress.data.coco import collate
    from edge_compress.train.trainer import normalize_batch

    loader = DataLoader(data, batch_size=batch_size, shuffle=False, collate_fn=collate)
    for i, (images, targets, _) in enumerate(loader):
        if i == batches:
            break
        yield normalize_batch(images, model.input_spec), list(targets)


def open_data(model: nn.Module, data) -> tuple[Any, Any]:
    """The (augmented train, val) splits of dataset directory ``data`` at the model's input size,
    checked against the model's classes."""
    from edge_compress.pipeline import open_split

    spec = model.input_spec
    size = (spec.height, spec.width)
    train_ds, val_ds = open_split(data, "train", size, augment=True), open_split(data, "val", size)
    if tuple(val_ds.class_names) != tuple(model.class_names):
        raise DataError(f"the model was trained on classes {list(model.class_names)} but {data} has "
                        f"{list(val_ds.class_names)}; compress on the matching dataset")
    return train_ds, val_ds


_open_data = open_data   # the name benchmarks/compression.py first used


def _finetune(model: nn.Module, step: RecipeStep, teacher: nn.Module | None, train_data, run_dir: Path,
              progress: bool, device: str) -> None:
    """Fine-tune in place (with distillation when the step asks); the EMA weights are kept if enabled."""
    from edge_compress.compress.distill import distillation_loss
    from edge_compress.train.checkpoint import read_checkpoint
    from edge_compress.train.trainer import train

    loss = distillation_loss(model, teacher, step.distill) if step.distill is not None else None
    try:
        train(model, train_data, step.finetune, run_dir, progress=progress, device=device, extra_loss=loss)
    finally:
        if loss is not None:
            loss.remove_hooks()
    if step.finetune.ema:
        model.load_state_dict(read_checkpoint(run_dir / "last.pt", map_location=device)["ema"]["module"])
    model.cpu().eval()


def compress(model: nn.Module, recipe: Recipe, data, out: str | Path, progress: bool = True,
             device: str = "cpu", log: Callable[[str], None] | None = None) -> CompressResult:
    """Apply ``recipe`` to ``model`` in place, measuring after each stage; write ``out/model.pt``
    (compressed checkpoint) and ``out/report.json``. ``out`` must not exist; on any error nothing
    is left there. ``data``: a dataset directory (train split fine-tunes, val split scores)."""
    out = Path(out)
    if out.exists():
        raise ArtifactError(f"{out} already exists; choose a new --out directory (results are never overwritten)")
    log = log or (lambda msg: None)
    prior = [AppliedStep.from_dict(s) for s in getattr(model, "compression_steps", None) or []]
    check_order(_as_recipe_steps(prior, recipe.source) + recipe.steps, f"{recipe.source} (after the model's "
                f"earlier steps {[s.method for s in prior]})" if prior else recipe.source)
    train_ds, val_ds = open_data(model, data)
    model.cpu().eval()
    teacher = copy.deepcopy(model).eval() if any(s.distill and s.distill.teacher is None for s in recipe.steps) \
        else None
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        result = _run(model, recipe, train_ds, val_ds, teacher, staging, progress, device, log, prior)
        _write(staging, model, recipe, result)
        shutil.rmtree(staging / "finetune", ignore_errors=True)
        if out.exists():
            raise ArtifactError(f"{out} appeared while compressing; results left unwritten")
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    result.out = out
    return result


def _as_recipe_steps(applied: list[AppliedStep], source: str) -> tuple[RecipeStep, ...]:
    """Steps already applied to a model (a compressed checkpoint), as recipe steps for the order check."""
    return tuple(RecipeStep(s.method, method_entry(s.method).make_config(s.config, f"{source}: earlier step {i}"))
                 for i, s in enumerate(applied))


def _run(model, recipe: Recipe, train_ds, val_ds, teacher, staging: Path, progress: bool, device: str,
         log, prior: list[AppliedStep]) -> CompressResult:
    rows = [measure(model, val_ds, "baseline")]
    log(_row_text(rows[-1]))
    applied: list[AppliedStep] = list(prior)
    reports: list[dict[str, Any]] = []
    for i, step in enumerate(recipe.steps):
        entry = METHODS[step.method]
        verb = entry.verb_fn()
        log(f"step {i}: {step.method} ...")
        report = verb(model, step.config, **_data_args(verb, step.config, model, train_ds, val_ds)).to_dict()
        if "plan" not in report:
            raise ConfigError(f"{recipe.source}: step {i} ({step.method}): its report has no 'plan', so the "
                              "result could not be reloaded; the method does not follow the contract")
        applied.append(AppliedStep(step.method, config_dict(step.config), report["plan"]))
        model.compression_steps = [a.to_dict() for a in applied]     # fine-tune checkpoints rebuild from it
        reports.append(report)
        model.cpu().eval()
        rows.append(measure(model, val_ds, f"{i}: {step.method}"))
        log(_row_text(rows[-1]))
        if step.finetune is not None:
            label = f"{i}: finetune" + (" + distill" if step.distill else "")
            log(f"step {label} ({step.finetune.epochs} epoch(s)) ...")
            _finetune(model, step, teacher, train_ds, staging / "finetune" / f"step{i}", progress, device)
            rows.append(measure(model, val_ds, label))
            log(_row_text(rows[-1]))
    return CompressResult(staging, model, rows, applied, reports)


def _row_text(r: StageRow) -> str:
    return (f"  {r.stage:<28} params {r.params / 1e6:8.4f} M (nonzero {r.params_nonzero / 1e6:.4f} M)  "
            f"GFLOPs {r.gflops:8.4f}  AP {r.ap:.4f}  AP50 {r.ap50:.4f}")


def _write(staging: Path, model: nn.Module, recipe: Recipe, result: CompressResult) -> None:
    metrics = {"rows": [r.to_dict() for r in result.rows]}
    save_compressed(staging / "model.pt", model, result.steps, extra={"recipe": recipe.to_dict(), **metrics})
    write_json_atomic(staging / "report.json", {"recipe": recipe.to_dict(), "source": recipe.source,
                                                "model": model.config(), **metrics,
                                                "steps": [s.to_dict() for s in result.steps],
                                                "reports": result.reports})
