"""Knowledge distillation for detectors, pluggable into any fine-tune (survey family 4).

``distillation_loss(student, teacher, DistillConfig(...))`` returns an ``extra_loss`` for
``edge_compress.train.train(..., extra_loss=...)``: a module called as
``loss(model, x, raw, targets) -> (tensor, parts)`` whose ``parameters()`` are the
adaptation convs of feature imitation (the trainer optimises them with the student).
The teacher runs in eval mode under ``no_grad`` and is not a submodule, so none of its
weights is trained or saved with the loss (and its ``requires_grad`` flags are not touched).

Terms, all computed on the raw ``(N, P, K)`` head outputs (layouts in
``edge_compress.models.postprocess``), so student and teacher must share the head type,
classes and priors (the same family at the same input size, e.g. picodet_s -> picodet_xs):

* class scores (Hinton et al. 2015, with temperature ``T``; for detectors Chen et al.,
  NeurIPS 2017): sigmoid heads (``gfl`` class logits, ``yolo`` objectness + class logits)
  get the Bernoulli KL ``KL(sigmoid(t/T) || sigmoid(s/T))`` per channel, the ``ssd``
  softmax head the categorical KL over background + classes; summed over channels, times
  ``T^2``, averaged over priors weighted by the larger foreground confidence of the two
  models (where either sees an object). Zero exactly when the outputs agree.
* localisation: for ``gfl`` heads, Localization Distillation (Zheng et al., CVPR 2022):
  ``KL(softmax(t/T) || softmax(s/T))`` between the per-side distance distributions,
  averaged over the four sides and weighted per prior by the teacher's top class
  score (a soft stand-in for LD's main/valuable localisation regions). Heads that
  regress offsets directly (``yolo``, ``ssd``) get the squared error of the offsets,
  weighted by the teacher's foreground confidence (objectness / 1 - background).
* features (FitNets, Romero et al. 2015; hint learning of Chen et al. 2017): for each
  ``(student_layer, teacher_layer)`` pair a 1x1 adaptation conv maps the student's
  channels to the teacher's and the mean squared error is taken over the whole map
  (no foreground mask); a student map of another size is resized bilinearly first.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_compress.errors import ConfigError, require_known_keys


@dataclass(frozen=True)
class DistillConfig:
    """Weights of the three terms (0 turns a term off), the temperature and the teacher.

    ``teacher``: a checkpoint path (training or compressed), a zoo name whose trained run
    ``runs/<name>/best.pt`` exists, or None for the teacher the caller passes (in a recipe:
    the uncompressed model). ``feature_pairs``: ``(student_layer, teacher_layer)`` module names.
    """

    teacher: str | None = None
    output_weight: float = 1.0
    temperature: float = 1.0   # picodet_xs 128 px, 50%-FLOPs pruning, 6-epoch fine-tune: AP 0.2354 at T=1,
                               # 0.2292 without distillation (teacher AP 0.335); T=2 did worse on a weaker teacher
    box_weight: float = 1.0
    feature_weight: float = 0.0
    feature_pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        for name in ("output_weight", "box_weight", "feature_weight"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"distill.{name}={getattr(self, name)} must be >= 0 (0 turns the term off)")
        if not float(self.temperature) > 0:
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0 (typically 1-4)")
        pairs = tuple(tuple(p) for p in self.feature_pairs)
        if any(len(p) != 2 or not all(isinstance(n, str) for n in p) for p in pairs):
            raise ConfigError(f"distill.feature_pairs={self.feature_pairs!r}: each entry is a "
                              "[student_layer, teacher_layer] pair of module names")
        object.__setattr__(self, "feature_pairs", pairs)
        if self.feature_weight and not pairs:
            raise ConfigError("distill.feature_weight > 0 but feature_pairs is empty: name the "
                              "(student_layer, teacher_layer) pairs to imitate, or set feature_weight=0")
        if not (self.output_weight or self.box_weight or self.feature_weight):
            raise ConfigError("distill: every weight is 0, so nothing would be distilled; set output_weight, "
                              "box_weight or feature_weight > 0")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["feature_pairs"] = [list(p) for p in self.feature_pairs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "distill") -> "DistillConfig":
        require_known_keys(cls, d, what="distill setting", source=source)
        return cls(**d)


def load_teacher(spec: str) -> nn.Module:
    """The teacher named by ``DistillConfig.teacher``: a checkpoint file, or a zoo name's trained run."""
    from edge_compress.models import list_detectors
    from edge_compress.train.checkpoint import load_detector

    path = Path(spec)
    if path.is_file():
        return load_detector(path)
    if spec in list_detectors():
        run = Path("runs") / spec / "best.pt"
        if run.is_file():
            return load_detector(run)
        raise ConfigError(f"distill.teacher='{spec}' is a zoo model but {run} does not exist: an untrained "
                          f"teacher teaches nothing; train it first (`edge-compress train --model {spec} "
                          "--data DIR`) or give the path of a trained checkpoint")
    raise ConfigError(f"distill.teacher='{spec}' is neither a checkpoint file nor a zoo name; give the .pt file "
                      "of a trained detector (or leave it empty to distil from the uncompressed model)")


# ---- output terms (pure functions of raw head tensors) ----

def bernoulli_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Element-wise ``KL(sigmoid(t/T) || sigmoid(s/T))`` of logits, stable through logsigmoid."""
    s, t = student / temperature, teacher / temperature
    p = t.sigmoid()
    return p * (F.logsigmoid(t) - F.logsigmoid(s)) + (1 - p) * (F.logsigmoid(-t) - F.logsigmoid(-s))


def categorical_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``KL(softmax(t/T) || softmax(s/T))`` over the last dimension -> shape without it."""
    log_t = (teacher / temperature).log_softmax(-1)
    return (log_t.exp() * (log_t - (student / temperature).log_softmax(-1))).sum(-1)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (values * weights).sum() / weights.sum().clamp_min(1e-6)


def teacher_foreground(head: str, t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per prior, the teacher's confidence that it holds an object: top class score (gfl),
    objectness (yolo), ``1 - p(background)`` (ssd). Shape ``(N, P)``."""
    if head == "gfl":
        return t[..., :num_classes].sigmoid().amax(-1)
    if head == "yolo":
        return t[..., 4].sigmoid()
    return 1.0 - t[..., 4:].softmax(-1)[..., 0]


def class_distill(head: str, s: torch.Tensor, t: torch.Tensor, num_classes: int, temperature: float) -> torch.Tensor:
    """Class-score KL per prior (summed over channels), times ``T^2``, averaged over priors with
    weight ``max(teacher, student)`` foreground confidence (student side detached): the priors where
    either model sees an object, so misses and false positives both count while the thousands of
    background priors both agree on do not drown the term (a plain mean over priors made it ~10x
    smaller than the detector loss, a sum over the teacher's foreground ~10x larger)."""
    if head == "gfl":
        kl = bernoulli_kl(s[..., :num_classes], t[..., :num_classes], temperature).sum(-1)
    elif head == "yolo":
        kl = bernoulli_kl(s[..., 4:], t[..., 4:], temperature).sum(-1)
    else:   # ssd: background + classes under one softmax
        kl = categorical_kl(s[..., 4:], t[..., 4:], temperature)
    weight = torch.maximum(teacher_foreground(head, t, num_classes), teacher_foreground(head, s.detach(), num_classes))
    return _weighted_mean(kl, weight) * temperature ** 2


def box_distill(head: str, s: torch.Tensor, t: torch.Tensor, num_classes: int, reg_max: int,
                temperature: float) -> torch.Tensor:
    """LD on GFL distance distributions; teacher-confidence-weighted offset imitation otherwise."""
    weight = teacher_foreground(head, t, num_classes)
    if head == "gfl":
        c, bins = num_classes, reg_max + 1
        kl = categorical_kl(s[..., c:].unflatten(-1, (4, bins)), t[..., c:].unflatten(-1, (4, bins)), temperature)
        return _weighted_mean(kl.mean(-1), weight) * temperature ** 2
    return _weighted_mean((s[..., :4] - t[..., :4]).pow(2).sum(-1), weight)


# ---- the extra_loss module ----

class _Capture:
    """Forward hook keeping a module's latest output."""

    def __init__(self, module: nn.Module):
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        self.value = output


def _named(model: nn.Module, name: str, field: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        import difflib

        close = difflib.get_close_matches(name, list(modules), n=3, cutoff=0.5)
        raise ConfigError(f"distill.feature_pairs: {field} layer '{name}' matches no module "
                          f"(did you mean {close}?); see `edge-compress zoo summary NAME --layers`")
    return modules[name]


class DistillationLoss(nn.Module):
    """``extra_loss`` of the trainer (see the module docstring). Submodules: the adaptation convs only."""

    def __init__(self, student: nn.Module, teacher: nn.Module, config: DistillConfig):
        super().__init__()
        _check_pair(student, teacher, config)
        self.config = config
        # Lists: not registered as submodules (neither trained nor saved with the loss). The teacher
        # runs under no_grad; its requires_grad flags are left as the caller set them.
        self._student, self._teacher = [student], [teacher.eval()]
        self._captures: list[tuple[_Capture, _Capture]] = []
        self.adapters = nn.ModuleList()
        for s_name, t_name in config.feature_pairs:
            self._captures.append((_Capture(_named(student, s_name, "student")),
                                   _Capture(_named(teacher, t_name, "teacher"))))
        if config.feature_pairs:
            self._build_adapters(student, teacher)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def _build_adapters(self, student: nn.Module, teacher: nn.Module) -> None:
        spec = student.input_spec
        x = torch.zeros(1, 3, spec.height, spec.width, device=student.priors_t.device)
        was = student.training
        student.eval()
        with torch.no_grad():
            student(x)
            teacher(x.to(teacher.priors_t.device))
        student.train(was)
        for (s_cap, t_cap), (s_name, t_name) in zip(self._captures, self.config.feature_pairs):
            if s_cap.value is None or s_cap.value.ndim != 4 or t_cap.value is None or t_cap.value.ndim != 4:
                raise ConfigError(f"distill.feature_pairs ({s_name}, {t_name}): both layers must output a "
                                  "4-D feature map (N, C, H, W) in the forward pass")
            conv = nn.Conv2d(s_cap.value.shape[1], t_cap.value.shape[1], 1)
            self.adapters.append(conv.to(s_cap.value.device))
            s_cap.value = t_cap.value = None

    def remove_hooks(self) -> None:
        """Detach the feature hooks from student and teacher (call when the fine-tune is over)."""
        for s_cap, t_cap in self._captures:
            s_cap.handle.remove()
            t_cap.handle.remove()

    def forward(self, model: nn.Module, x: torch.Tensor, raw: torch.Tensor,
                targets: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        if model is not self._student[0]:
            raise ConfigError("distillation loss called with another model than the student it was built for")
        teacher, cfg = self.teacher, self.config
        if teacher.priors_t.device != x.device:
            teacher.to(x.device)
        teacher.eval()
        with torch.no_grad():
            t_raw = teacher(x)
        total, parts = raw.new_zeros(()), {}
        post = model.post
        if cfg.output_weight:
            term = class_distill(post.head, raw, t_raw, post.num_classes, cfg.temperature)
            total, parts["kd_cls"] = total + cfg.output_weight * term, float(term.detach())
        if cfg.box_weight:
            term = box_distill(post.head, raw, t_raw, post.num_classes, post.reg_max, cfg.temperature)
            total, parts["kd_box"] = total + cfg.box_weight * term, float(term.detach())
        if cfg.feature_weight:
            term = self._feature_term()
            total, parts["kd_feat"] = total + cfg.feature_weight * term, float(term.detach())
        return total, parts

    def _feature_term(self) -> torch.Tensor:
        terms = []
        for (s_cap, t_cap), adapt in zip(self._captures, self.adapters):
            if s_cap.value is None or t_cap.value is None:
                raise ConfigError("distill: a feature layer did not run in the last forward pass")
            s = adapt(s_cap.value)
            t = t_cap.value.detach()
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            terms.append(F.mse_loss(s, t))
            s_cap.value = t_cap.value = None
        return torch.stack(terms).mean()


def _check_pair(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> None:
    """Output terms compare raw tensors prior by prior: same head, classes and priors needed."""
    if not (config.output_weight or config.box_weight):
        return
    sp, tp = student.post, teacher.post
    if sp.head != tp.head or tuple(student.class_names) != tuple(teacher.class_names):
        raise ConfigError(f"distill: teacher head '{tp.head}' with classes {list(teacher.class_names)} does not "
                          f"match the student's '{sp.head}' with {list(student.class_names)}; output "
                          "distillation needs the same head and classes (use feature terms only: "
                          "output_weight=0, box_weight=0)")
    if student.priors().shape != teacher.priors().shape or sp.channels != tp.channels:
        raise ConfigError(f"distill: teacher has {len(teacher.priors())} priors x {tp.channels} channels, the "
                          f"student {len(student.priors())} x {sp.channels}: output distillation compares them "
                          "prior by prior; use a teacher of the same family, strides and input size")


def distillation_loss(student: nn.Module, teacher: nn.Module | None, config: DistillConfig) -> DistillationLoss:
    """The ``extra_loss`` distilling ``teacher`` (or ``config.teacher`` when given) into ``student``."""
    if config.teacher is not None:
        teacher = load_teacher(config.teacher)
    if teacher is None:
        raise ConfigError("distill: no teacher: set distill.teacher to a checkpoint, or pass the teacher model")
    return DistillationLoss(student, teacher, config)
