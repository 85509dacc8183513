"""The training engine: one run of SGD on an MLP or a small conv net, with metrics per step and per checkpoint.

A run is described by a ``TrainSpec`` (everything that decides its result) and gives a
``RunResult``: the training loss and batch accuracy at every step, the test accuracy and
loss at every checkpoint (``eval_every`` steps, step 0 and the last step included, full
batch, eval mode) and the requested probes at the same checkpoints. The model's weights
and the order of the mini-batches both come from ``seed``, so runs that differ only in
the norm start from the same weights and see the same batches; what draws from torch's
global generator during training (dropout, noisy norms) is seeded from ``seed`` too, and the
caller's global random state is left as it was. With ``classes_per_batch`` each mini-batch
is drawn from that many random classes only (non-i.i.d. batches).
A run stops early when the loss is no longer finite and records the step (``diverged_at``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .data import Dataset
from .models import MLP, NORMS_2D, convnet, mlp
from .probes import PROBES

# on_progress(step, steps, train_loss, test_accuracy or None)
ProgressFn = Callable[[int, int, float, float | None], None]


@dataclass(frozen=True)
class TrainSpec:
    """One training run. Defaults: the MLP of Ioffe & Szegedy's Fig. 1 (3x100 sigmoid, batch 60)."""

    widths: tuple[int, ...] = (100, 100, 100)  # hidden layer sizes
    activation: str = "sigmoid"
    norm: str = "none"  # a kind of models.NORMS
    placement: str = "before"  # norm before or after the activation
    init: str = "torch"  # models.INITS
    lr: float = 0.5
    momentum: float = 0.0
    batch_size: int = 60
    steps: int = 1000
    eval_every: int = 100
    seed: int = 0
    probes: tuple[str, ...] = ()  # names of probes.PROBES, taken at every checkpoint
    norm_options: tuple[tuple[str, float], ...] = ()  # keyword arguments of the norm, as (name, value) pairs
    dropout: float = 0.0  # dropout probability at the end of every hidden block
    classes_per_batch: int = 0  # 0: i.i.d. batches; k: every batch drawn from k random classes
    arch: str = "mlp"  # "mlp", or "conv": models.convnet on the data's images, ``widths`` its channels

    def label(self) -> str:
        """A short readable name, e.g. ``sigmoid-3x100-ours-before-lr0.5-seed0``."""
        depth = f"{len(self.widths)}x{self.widths[0]}" if len(set(self.widths)) == 1 else "-".join(map(str, self.widths))
        place = f"-{self.placement}" if self.norm != "none" else ""
        init = f"-{self.init}" if self.init != "torch" else ""
        extra = "".join(f"-{k}{v:g}" for k, v in self.norm_options)
        extra += (f"-drop{self.dropout:g}" if self.dropout else "") + (f"-{self.classes_per_batch}cls" if self.classes_per_batch else "")
        arch = "conv-" if self.arch == "conv" else ""
        return f"{arch}{self.activation}-{depth}{init}-{self.norm}{place}{extra}-lr{self.lr:g}-seed{self.seed}"

    def to_json(self) -> dict:
        """The fields as JSON values (tuples become lists)."""
        return {**asdict(self), "widths": list(self.widths), "probes": list(self.probes),
                "norm_options": [list(p) for p in self.norm_options]}


@dataclass
class RunResult:
    """What one run measured (JSON-ready; see the module docstring)."""

    spec: dict
    train_loss: list[float]  # per step
    train_accuracy: list[float]  # per step, on the step's mini-batch
    eval_steps: list[int]  # checkpoints
    test_accuracy: list[float]  # per checkpoint
    test_loss: list[float]  # per checkpoint
    probes: dict[str, list[dict]] = field(default_factory=dict)  # name -> one entry per checkpoint
    diverged_at: int | None = None
    seconds: float = 0.0

    @property
    def final_test_accuracy(self) -> float:
        return self.test_accuracy[-1]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> RunResult:
        return cls(**d)


ARCHS = ("mlp", "conv")
EVAL_CHUNK = 2000  # test examples per forward pass in evaluation (eval mode: rows are independent)


def build_model(spec: TrainSpec, data: Dataset) -> MLP:
    """The model of ``spec`` for ``data``'s features and classes, initialised from ``spec.seed``."""
    if spec.arch not in ARCHS:
        raise ValueError(f"unknown arch {spec.arch!r}: expected one of {ARCHS}")
    if spec.arch == "conv":
        if data.image_shape is None:
            raise ValueError(f"a conv net needs images: data set {data.name!r} has flat rows (use digits, mnist, "
                             "fashion-mnist or cifar10)")
        if spec.placement != "before" or spec.dropout or spec.norm not in NORMS_2D:
            raise ValueError(f"the conv net takes a norm of {sorted(NORMS_2D)} before the activation and no dropout, "
                             f"got norm {spec.norm!r}, placement {spec.placement!r}, dropout {spec.dropout}")
        return convnet(data.image_shape, spec.widths, data.n_classes, activation=spec.activation, norm=spec.norm,
                       seed=spec.seed, init=spec.init, norm_options=dict(spec.norm_options))
    return mlp(data.n_features, spec.widths, data.n_classes, activation=spec.activation,
               norm=spec.norm, placement=spec.placement, seed=spec.seed, init=spec.init,
               norm_options=dict(spec.norm_options), dropout=spec.dropout)


def few_class_batch(labels: torch.Tensor, classes: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of ``batch_size`` examples drawn without replacement from ``classes`` random classes."""
    chosen = torch.randperm(int(labels.max()) + 1, generator=generator)[:classes]
    pool = torch.nonzero(torch.isin(labels, chosen)).flatten()
    return pool[torch.randperm(len(pool), generator=generator)[:batch_size]]


def evaluate(model: MLP, data: Dataset) -> tuple[float, float]:
    """Test accuracy and loss, full batch, eval mode; non-finite logits count as wrong."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x) for x in torch.split(data.x_test, EVAL_CHUNK)])
        finite = torch.isfinite(logits).all(dim=1)
        correct = (logits.argmax(dim=1) == data.y_test) & finite
        loss = F.cross_entropy(logits, data.y_test).item()
    model.train(was_training)
    return correct.double().mean().item(), loss


def train(spec: TrainSpec, data: Dataset, on_progress: ProgressFn | None = None) -> RunResult:
    """Train the model of ``spec`` on ``data`` with plain SGD and measure it (see module doc)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return _train(spec, data, on_progress)


def _train(spec: TrainSpec, data: Dataset, on_progress: ProgressFn | None) -> RunResult:
    unknown = [p for p in spec.probes if p not in PROBES]
    if unknown:
        raise ValueError(f"unknown probes {unknown}: expected names from {sorted(PROBES)}")
    if spec.batch_size > len(data.y_train):
        raise ValueError(f"batch_size {spec.batch_size} exceeds the {len(data.y_train)} training examples")
    if not 0 <= spec.classes_per_batch <= data.n_classes:
        raise ValueError(f"classes_per_batch {spec.classes_per_batch}: expected 0 (i.i.d.) to {data.n_classes}")
    start = time.perf_counter()
    model = build_model(spec, data)
    optimizer = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum)
    order = torch.Generator().manual_seed(spec.seed)
    result = RunResult(spec.to_json(), [], [], [], [], [], {name: [] for name in spec.probes})

    def checkpoint(step: int) -> None:
        accuracy, loss = evaluate(model, data)
        result.eval_steps.append(step)
        result.test_accuracy.append(accuracy)
        result.test_loss.append(loss)
        for name in spec.probes:
            result.probes[name].append(PROBES[name](model, data))
        if on_progress:
            on_progress(step, spec.steps, result.train_loss[-1] if result.train_loss else float("nan"), accuracy)

    model.train()
    checkpoint(0)
    batches = torch.empty(0, dtype=torch.long)
    per_epoch = len(data.y_train) // spec.batch_size
    for step in range(1, spec.steps + 1):
        i = (step - 1) % per_epoch
        if spec.classes_per_batch:
            index = few_class_batch(data.y_train, spec.classes_per_batch, spec.batch_size, order)
        else:
            if i == 0:
                batches = torch.randperm(len(data.y_train), generator=order)[: per_epoch * spec.batch_size].view(per_epoch, -1)
            index = batches[i]
        x, y = data.x_train[index], data.y_train[index]
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        result.train_loss.append(loss_value)
        result.train_accuracy.append((logits.detach().argmax(dim=1) == y).double().mean().item())
        if not math.isfinite(loss_value):
            result.diverged_at = step
            checkpoint(step)
            break
        if step % spec.eval_every == 0 or step == spec.steps:
            checkpoint(step)
        elif on_progress and step % 10 == 0:
            on_progress(step, spec.steps, loss_value, None)
    result.seconds = time.perf_counter() - start
    return result
