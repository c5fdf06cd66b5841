"""Fine-tuning stages: from frozen features to adapted backbones.

Modes, as the transfer-learning literature uses them:

* ``head``    — a new linear classifier on frozen features. The features are computed
  once (no augmentation), so this trains in seconds.
* ``partial`` — the last stage(s) (``--unfreeze``, default per family, e.g. ResNet's
  ``layer4``) train at ``lr * backbone_lr_mult``, the new head at ``lr``.
* ``full``    — everything trains, the backbone at ``lr * backbone_lr_mult``.

Frozen parts keep their BatchNorm statistics (their BN layers stay in eval mode).
GoogLeNet / Inception v3 add their auxiliary classifiers' losses in ``partial`` and
``full`` (weights 0.3 and 0.4, as in the papers' training recipes).

Training follows the classic recipes: SGD with momentum and weight decay (AdamW as an
option), cosine or step schedule after a linear warm-up, optional label smoothing,
augmentation for training only, mixed precision on a GPU. Splits are the probe's
(stratified, seeded, over sorted ids: the same test images), so fine-tuned and frozen
numbers compare. Each epoch validates; the best weights are kept; ``last.pt`` lets a
killed run resume, and each epoch seeds its own randomness, so a resumed run ends where
an uninterrupted one does.

Outputs in ``--out``: ``checkpoint.pt`` (best; ``extract --weights`` takes it),
``last.pt`` (resume state), ``history.csv``, ``history.png``, ``finetune.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch import nn

from .backbones import AuxHead, get_spec, load_classifier
from .config import DEFAULT_MAX_PIXELS, Augment, FinetuneConfig, Mode, Optimizer, Schedule
from .errors import FinetuneError
from .files import atomic_write_bytes, atomic_write_text
from .images.decode import load_image
from .images.preprocess import Preprocessing
from .images.sources import ImageRecord, open_source

log = logging.getLogger(__name__)


# --- the network ---------------------------------------------------------------------


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def _final_linears(model: nn.Module, aux_heads: tuple[AuxHead, ...]) -> list[str]:
    """Module paths of the main classifier's last Linear and of each auxiliary head's."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise FinetuneError(f"{type(model).__name__} has no Linear classifier to replace")
    aux_modules = {h.module for h in aux_heads}
    heads = [[n for n in linears if n.split(".")[0] not in aux_modules][-1]]
    for head in aux_heads:
        heads += [n for n in linears if n.split(".")[0] == head.module][-1:]
    return heads


def _build_flags(model: nn.Module, family) -> dict[str, bool]:
    """The builder flags a checkpoint must be rebuilt with: GoogLeNet/Inception's
    ``transform_input``, which is on only for networks that descend from ImageNet weights."""
    return {"transform_input": bool(model.transform_input)} if family.transform_input else {}


def build_network(config: FinetuneConfig, n_classes: int) -> tuple[nn.Module, list[str], Preprocessing, dict]:
    """The pretrained network with new ``n_classes``-way head(s).

    Returns (model, head module paths, preprocessing, weights provenance).
    """
    spec = get_spec(config.backbone)
    model, info, preprocessing = load_classifier(config.backbone, weights=config.weights, seed=config.seed)
    if spec.family == "timm":
        model.reset_classifier(n_classes)
        heads = [n for n, m in model.named_modules() if m is model.get_classifier()]
    else:
        aux_wanted = config.mode != Mode.HEAD
        if aux_wanted and spec.family == "googlenet" and model.aux1 is None:
            # torchvision's pretrained GoogLeNet ships without its auxiliary heads: add
            # fresh ones (at inception4a and 4d, as in the paper) so that they train
            from torchvision.models.googlenet import InceptionAux

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model.aux1, model.aux2 = InceptionAux(512, 1000), InceptionAux(528, 1000)
        aux_heads = spec.family_row.aux_heads
        for head in aux_heads:
            if not aux_wanted and getattr(model, head.module, None) is not None:
                setattr(model, head.module, None)
        if aux_heads:
            model.aux_logits = aux_wanted and any(getattr(model, h.module, None) is not None for h in aux_heads)
        heads = _final_linears(model, aux_heads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            for path in heads:
                old = model.get_submodule(path)
                _set(model, path, nn.Linear(old.in_features, n_classes))
    if config.resize_size or config.crop_size:
        preprocessing = dataclasses.replace(
            preprocessing, resize_size=config.resize_size or preprocessing.resize_size,
            crop_size=config.crop_size or preprocessing.crop_size,
        )
    return model, heads, preprocessing, info.to_dict()


def trainable_prefixes(config: FinetuneConfig, heads: list[str]) -> list[str]:
    """Module paths whose parameters train: the heads, plus the unfrozen stages."""
    family = get_spec(config.backbone).family_row
    if config.mode == Mode.FULL:
        return [""]
    if config.mode == Mode.HEAD:
        return heads
    unfreeze = config.unfreeze or family.unfreeze
    if not unfreeze:
        raise FinetuneError(f"no default stage to unfreeze for {family.name}; pass --unfreeze MODULE")
    aux_modules = {h.module for h in family.aux_heads}
    aux = [h.split(".")[0] for h in heads if h.split(".")[0] in aux_modules]  # whole aux heads train
    return [*heads, *aux, *unfreeze]


def _in(name: str, prefixes: list[str]) -> bool:
    return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)


def freeze(model: nn.Module, prefixes: list[str]) -> None:
    """requires_grad only under ``prefixes``; unknown prefixes are an error."""
    names = {n for n, _ in model.named_modules()}
    unknown = [p for p in prefixes if p and p not in names]
    if unknown:
        top = sorted({n.split(".")[0] for n in names if n})
        raise FinetuneError(f"no module named {unknown} to unfreeze; top-level modules: {top}")
    for name, p in model.named_parameters():
        p.requires_grad_(_in(name, prefixes))


def set_train_mode(model: nn.Module, prefixes: list[str]) -> None:
    """Train mode for trainable parts; frozen BatchNorm layers keep their statistics."""
    model.train()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not _in(name, prefixes):
            m.eval()


# --- data ----------------------------------------------------------------------------


def _train_transform(p: Preprocessing, augment: Augment) -> T.Compose:
    resample = T.InterpolationMode(p.interpolation)
    if augment == Augment.NONE:
        steps = [T.Resize(p.resize_size, interpolation=resample), T.CenterCrop(p.crop_size)]
    else:
        steps = [T.RandomResizedCrop(p.crop_size, interpolation=resample), T.RandomHorizontalFlip()]
        if augment == Augment.STRONG:
            steps += [T.ColorJitter(0.4, 0.4, 0.4), T.TrivialAugmentWide(interpolation=resample)]
    return T.Compose([*steps, T.PILToTensor()])


class ImageDataset(torch.utils.data.Dataset):
    """Records -> (uint8 (C, H, W), class index); unreadable images are dropped upstream."""

    def __init__(self, records: list[ImageRecord], targets: np.ndarray, p: Preprocessing,
                 transform: T.Compose | None) -> None:
        self.records, self.targets, self.p, self.transform = records, targets, p, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open(self.records[i].path, "rb") as f:
            img, _ = load_image(f.read(), mode=self.p.mode, max_pixels=DEFAULT_MAX_PIXELS)
        if self.transform is None:
            x = torch.from_numpy(self.p.resize_crop(img).copy()).permute(2, 0, 1)
        else:
            x = self.transform(img)
        return x, int(self.targets[i])


def _readable(records: list[ImageRecord], p: Preprocessing) -> tuple[list[ImageRecord], int]:
    """Drop images that cannot be decoded (they are counted, not trained on)."""
    from .config import DecodeMode
    from .images.decode import DecodeFailure, decode_file

    ok = [r for r in records
          if not isinstance(decode_file(r.path, p, max_pixels=DEFAULT_MAX_PIXELS, mode=DecodeMode.DRAFT), DecodeFailure)]
    return ok, len(records) - len(ok)


# --- the loop ------------------------------------------------------------------------


def _optimizer(config: FinetuneConfig, model: nn.Module, heads: list[str]) -> torch.optim.Optimizer:
    head_params, body_params = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head_params if _in(name, heads) else body_params).append(p)
    groups = [{"params": head_params, "lr": config.lr}]
    if body_params:
        groups.append({"params": body_params, "lr": config.lr * config.backbone_lr_mult})
    if config.optimizer == Optimizer.ADAMW:
        return torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    return torch.optim.SGD(groups, momentum=config.momentum, weight_decay=config.weight_decay)


def _schedule(config: FinetuneConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if config.schedule == Schedule.STEP:  # /10 at 1/2 and 3/4 of training
            return 0.1 ** sum(step >= total * f for f in (0.5, 0.75))
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _loss(
    outputs, y: torch.Tensor, criterion: nn.Module, aux_heads: tuple[AuxHead, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(total loss with the auxiliary heads' weighted terms, main logits)."""
    if isinstance(outputs, tuple) and hasattr(outputs, "_fields"):  # GoogLeNet/InceptionOutputs
        main = outputs.logits
        loss = criterion(main, y)
        for head in aux_heads:
            aux = getattr(outputs, head.output, None)
            if aux is not None:
                loss = loss + head.loss_weight * criterion(aux, y)
        return loss, main
    return criterion(outputs, y), outputs


def _normalise(x: torch.Tensor, p: Preprocessing, device: torch.device) -> torch.Tensor:
    from .extraction.forward import standardize

    return standardize(x.to(device, non_blocking=True), p)


@torch.inference_mode()
def evaluate(model: nn.Module, loader, prepare) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) of ``model`` over ``loader``; ``prepare``
    turns a loader batch into the model's input on its device."""
    model.eval()
    total, correct, loss = 0, 0, 0.0
    device = next(model.parameters()).device
    for x, y in loader:
        y = y.to(device)
        logits = model(prepare(x))
        loss += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        total += len(y)
    return loss / max(total, 1), correct / max(total, 1)


@torch.inference_mode()
def _feature_loader(model: nn.Module, head: str, loader, prepare, *, shuffle: bool, seed: int, batch_size: int):
    """Run the frozen network once and keep the head's inputs: ``head`` mode then trains
    on these cached features in seconds instead of re-running the backbone each epoch."""
    captured: list[torch.Tensor] = []
    hook = model.get_submodule(head).register_forward_pre_hook(lambda m, args: captured.append(args[0].float().cpu()))
    model.eval()
    ys = []
    try:
        for x, y in loader:
            model(prepare(x))
            ys.append(y)
    finally:
        hook.remove()
    ds = torch.utils.data.TensorDataset(torch.cat(captured), torch.cat(ys))
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle,
                                       generator=torch.Generator().manual_seed(seed))


def split_rows(ids: np.ndarray, y: np.ndarray, config: FinetuneConfig) -> dict[str, np.ndarray]:
    """Positions of the ``"train"``, ``"val"`` and ``"test"`` rows, each sorted int64.

    ``ids``: (n,) str; ``y``: (n,) int class indices, classes in sorted label order. The
    test rows are the probe's: :func:`~embedpipe.probe.linear.split_by_id` with the same
    ``test_size`` and seed holds out the same images that ``embedpipe probe`` holds out of
    their embeddings, so fine-tuned and frozen accuracies are measured on the same images.
    Validation is held out of the rest the same way. Both draw over ids, so the order the
    records come in changes nothing.
    """
    from .probe.linear import split_by_id

    ids = np.asarray(ids, dtype=object)
    train, test = split_by_id(ids, y, fraction=config.test_size, seed=config.seed)
    fit, val = split_by_id(
        ids[train], y[train], fraction=config.val_size, seed=config.seed, held_out="validation"
    )
    return {"train": train[fit], "val": train[val], "test": test}


def _seed_epoch(seed: int, epoch: int, loader: torch.utils.data.DataLoader) -> None:
    """Seed all of one epoch's randomness from (``seed``, ``epoch``) alone.

    The loader's generator draws the shuffle and the seeds of its workers (their
    augmentation); torch's global RNGs (CPU and CUDA) draw augmentation in this process
    and dropout. An epoch then draws the same numbers whether the run got there in one go
    or resumed, so a run resumed after any epoch ends with the weights of an uninterrupted
    one (bit for bit on a CPU) without saving any RNG state.
    """
    epoch_seed = int(np.random.SeedSequence((seed, epoch)).generate_state(1)[0])
    loader.generator.manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed)


@dataclass
class FinetuneResult:
    out: str
    best_epoch: int
    best_val_accuracy: float
    test_accuracy: float
    epochs_run: int
    skipped_images: int
    classes: list[str]


_RESUME_FORMAT = 2
"""Layout of ``last.pt``; 2 added the scaler and early-stopping state and seeds each epoch."""


def _save(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(buf.getvalue(), path)


def finetune(config: FinetuneConfig, *, progress: bool = False) -> FinetuneResult:
    """Train ``config.backbone`` on the labelled images of ``config.source``.

    Re-running the same command after a crash resumes from ``last.pt``; a finished run
    is not repeated. A different configuration in the same ``--out`` is refused.
    """
    config.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if config.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    records = open_source(config.source)
    if not records or any(r.label is None for r in records):
        raise FinetuneError(f"{config.source}: fine-tuning needs labelled images (class subfolders or a label column)")
    classes = sorted({r.label for r in records})
    if len(classes) < 2:
        raise FinetuneError(f"{config.source}: fine-tuning needs at least two classes, found {classes}")
    model, heads, p, weights = build_network(config, len(classes))
    aux_heads = get_spec(config.backbone).family_row.aux_heads
    records, skipped = _readable(records, p)
    y_all = np.array([classes.index(r.label) for r in records])
    parts = split_rows(np.array([r.id for r in records], dtype=object), y_all, config)

    trainable = trainable_prefixes(config, heads)
    freeze(model, trainable)
    model.to(device)

    def loader(idx: np.ndarray, train: bool) -> torch.utils.data.DataLoader:
        ds = ImageDataset([records[i] for i in idx], y_all[idx], p,
                          _train_transform(p, config.augment) if train and config.mode != Mode.HEAD else None)
        g = torch.Generator().manual_seed(config.seed)
        return torch.utils.data.DataLoader(ds, batch_size=config.batch_size, shuffle=train, generator=g,
                                           num_workers=config.workers, pin_memory=device.type == "cuda",
                                           drop_last=False)

    train_loader, val_loader, test_loader = loader(parts["train"], True), loader(parts["val"], False), loader(parts["test"], False)
    prepare = lambda x: _normalise(x, p, device)  # noqa: E731
    net = model  # what the loop trains: the whole network, or in head mode only its head
    if config.mode == Mode.HEAD:
        train_loader, val_loader, test_loader = (
            _feature_loader(model, heads[0], ld, prepare, shuffle=sh, seed=config.seed, batch_size=config.batch_size)
            for ld, sh in ((train_loader, True), (val_loader, False), (test_loader, False))
        )
        net, trainable = model.get_submodule(heads[0]), [""]
        prepare = lambda x: x.to(device)  # noqa: E731
    opt = _optimizer(config, model, heads)
    sched = _schedule(config, opt, len(train_loader))
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    meta = {"base_backbone": config.backbone, "base_weights": weights, "mode": config.mode.value,
            "hparams": config.hparams(), "classes": classes, "heads": heads,
            # how the network was built, so that extract builds it the same way again
            "build": _build_flags(model, get_spec(config.backbone).family_row)}

    history: list[dict] = []
    start, best, stale = 0, {"epoch": -1, "val_accuracy": -1.0}, 0
    last = config.out / "last.pt"
    if last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        if state.get("format") != _RESUME_FORMAT:
            raise FinetuneError(f"{last} was written by an older embedpipe and cannot resume exactly; "
                                "delete it to start over, or choose another --out")
        if state["meta"]["hparams"] != meta["hparams"] or state["meta"]["base_backbone"] != config.backbone:
            raise FinetuneError(f"{config.out} holds a run with other settings; choose another --out")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when saved on a CPU, where the scaler is off
            scaler.load_state_dict(state["scaler"])
        start, history, best, stale = state["epoch"] + 1, state["history"], state["best"], state["stale"]
        log.info("resuming %s at epoch %d", config.out, start + 1)

    from tqdm.auto import tqdm

    # each epoch seeds torch's RNGs (see _seed_epoch); the caller's states are restored after
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for epoch in range(start, config.epochs):
            # checked before the epoch, so that resuming a run that stopped early stays stopped
            if config.early_stopping is not None and stale >= config.early_stopping:
                log.info("early stopping: no better validation in the %d epochs after epoch %d", stale, best["epoch"])
                break
            t0 = time.perf_counter()
            _seed_epoch(config.seed, epoch, train_loader)
            set_train_mode(net, trainable)
            seen, correct, total_loss = 0, 0, 0.0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
            for x, y in bar:
                y = y.to(device)
                with torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda"):
                    loss, logits = _loss(net(prepare(x)), y, criterion, aux_heads)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                seen += len(y)
                correct += (logits.argmax(1) == y).sum().item()
                total_loss += loss.item() * len(y)
                bar.set_postfix(loss=f"{total_loss / seen:.3f}", acc=f"{correct / seen:.3f}")
            val_loss, val_acc = evaluate(net, val_loader, prepare)
            row = {"epoch": epoch + 1, "train_loss": total_loss / seen, "train_accuracy": correct / seen,
                   "val_loss": val_loss, "val_accuracy": val_acc, "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            history.append(row)
            log.info("epoch %d: %s", epoch + 1, row)
            # ties in accuracy (common on small validation sets) go to the lower loss
            if (val_acc, -val_loss) > (best["val_accuracy"], -best.get("val_loss", math.inf)):
                best, stale = {"epoch": epoch + 1, "val_accuracy": val_acc, "val_loss": val_loss}, 0
                _save(config.out / "checkpoint.pt",
                      {"state_dict": model.state_dict(), "embedpipe_finetune": {**meta, **best}})
            else:
                stale += 1
            _save(last, {"format": _RESUME_FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
                         "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch,
                         "history": history, "best": best, "stale": stale, "meta": meta})
            _write_history(config.out, history)

    best_state = torch.load(config.out / "checkpoint.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(best_state["state_dict"])
    _, test_acc = evaluate(net, test_loader, prepare)
    result = FinetuneResult(str(config.out), best["epoch"], best["val_accuracy"], test_acc, len(history), skipped, classes)
    atomic_write_text(json.dumps({**meta, **dataclasses.asdict(result), "splits": {k: len(v) for k, v in parts.items()}},
                                 indent=2), config.out / "finetune.json")
    return result


def _write_history(out: Path, history: list[dict]) -> None:
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=list(history[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(history)
    atomic_write_text(text.getvalue(), out / "history.csv")
    plot_history(history, out / "history.png")


def plot_history(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch, train vs validation."""
    from matplotlib.figure import Figure

    from .figures import png

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.2), layout="tight")
    a, b = fig.subplots(1, 2)
    a.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    a.plot(epochs, [h["val_loss"] for h in history], "o-", label="validation")
    a.set(xlabel="epoch", ylabel="loss")
    b.plot(epochs, [h["train_accuracy"] for h in history], "o-", label="train")
    b.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="validation")
    b.set(xlabel="epoch", ylabel="top-1 accuracy", ylim=(0, 1.02))
    b.legend()
    atomic_write_bytes(png(fig), path)
