"""Train and evaluate DETR and its SMCA ablations. Flag names and defaults are DETR's, plus the ablation flags."""
import sys

if __name__ == "__main__":
    # --help and a flag error answer before torch and the models are imported (seconds of CPU)
    import options

    options.parse_main(sys.argv[1:])

import argparse  # the imports follow the early parse on purpose
import datetime
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import datasets
import engine
from models import build_model
from models.acceleration import accelerate, compile_report
from options import (ARCH_FLAGS, ablation_summary, check_args, default_device,  # noqa: F401 (DETR's API)
                     format_config, get_args_parser, main_parser, parse_main, resolve_args)
from rundir import checkpoint as ckpt
from rundir import checkpoint_space, model_weights, run_config, run_folder
from rundir.preemption import (INTERRUPT_EXIT_CODE, PREEMPTION_SIGNALS, STOP_SIGNALS, PreemptionHandler,
                               SignalSafeLoader, exit_for_requeue)
from util import dist
from util.errors import UserError
from util.misc import collate_fn, seed_everything
from util.tb import RunLogger


def _resume_path(args) -> str:
    if args.resume != "auto":
        return args.resume
    if not args.output_dir:
        raise UserError("--resume auto needs --output_dir (it resumes from <output_dir>/checkpoint.pth)")
    path = Path(args.output_dir) / "checkpoint.pth"
    return str(path) if path.exists() else ""


def _adopt_architecture(args, explicit, checkpoint: dict, path: str, ignore=()) -> list:
    """The architecture flags from a checkpoint's config, or inferred from an official DETR checkpoint's weights;
    returns the messages to print."""
    stored = checkpoint.get("config")
    if stored:
        return (run_config.reconcile_config(args, explicit, stored, ARCH_FLAGS, path, ignore)
                + run_config.dc5_batch_warning(args))
    return run_config.infer_official_config(checkpoint["model"], path, args, explicit, ignore)


def _param_groups(model, args):
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    return [{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone}]


def _apply_overrides(optimizer, lr_scheduler, args, explicit) -> None:
    """Explicit --lr/--lr_backbone/--weight_decay/--lr_drop win over the resumed optimizer and scheduler."""
    if "lr" in explicit or "lr_backbone" in explicit or "weight_decay" in explicit:
        decay = lr_scheduler.gamma ** (lr_scheduler.last_epoch // lr_scheduler.step_size)
        for group, base in zip(optimizer.param_groups, (args.lr, args.lr_backbone)):
            group["initial_lr"] = base
            group["lr"] = base * decay
            group["weight_decay"] = args.weight_decay
        lr_scheduler.base_lrs = [args.lr, args.lr_backbone]
        print(f"override on resume: lr {args.lr:g}, lr_backbone {args.lr_backbone:g}, "
              f"weight_decay {args.weight_decay:g} (current lr {optimizer.param_groups[0]['lr']:g})")
    if "lr_drop" in explicit:
        lr_scheduler.step_size = args.lr_drop
        print(f"override on resume: lr_drop {args.lr_drop}")
    if "epochs" in explicit:
        print(f"override on resume: epochs {args.epochs}")


def _val_sampler(dataset_val):
    if dist.get_world_size() > 1:
        return DistributedSampler(dataset_val, num_replicas=dist.get_world_size(), rank=dist.get_rank(),
                                  shuffle=False)
    return SequentialSampler(dataset_val)


def _collate(args):
    """DETR's collate; with --fixed_size every batch is padded to that canvas (datasets/fixed_size.py)."""
    return functools.partial(collate_fn, pad_to=args.fixed_size)


@dataclass
class Loaders:
    sampler_train: engine.ResumableSampler
    train: SignalSafeLoader
    val: SignalSafeLoader


def _loaders(args, dataset_train, dataset_val) -> Loaders:
    world, rank = dist.get_world_size(), dist.get_rank()
    # a seeded DistributedSampler also for one process: the data order depends only on (seed, epoch),
    # so a resumed run sees exactly the batches a straight run would
    sampler_train = engine.ResumableSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                            seed=args.seed)
    sampler_val = _val_sampler(dataset_val)
    common = dict(collate_fn=_collate(args), num_workers=args.num_workers, persistent_workers=False)
    # workers ignore the signals a launcher sends to the whole process group; the main process acts on them
    loader_train = SignalSafeLoader(dataset_train, batch_size=args.batch_size, sampler=sampler_train, drop_last=True,
                              **common)
    loader_val = SignalSafeLoader(dataset_val, batch_size=args.batch_size, sampler=sampler_val, drop_last=False,
                                  **common)
    if len(loader_train) == 0:
        raise UserError(f"the training set has {len(dataset_train)} images, fewer than --batch_size "
                        f"{args.batch_size} x {world} processes; lower --batch_size")
    return Loaders(sampler_train, loader_train, loader_val)


@dataclass
class Trainer:
    """The state of one training run and the rank-0 files it writes."""
    args: argparse.Namespace
    config: dict
    model: torch.nn.Module  # DDP-wrapped when distributed
    model_without_ddp: torch.nn.Module
    criterion: torch.nn.Module
    postprocessors: dict
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.StepLR
    device: torch.device
    folder: Optional[run_folder.RunFolder]  # --output_dir, owned by this run (None: nothing is written)
    start_epoch: int = 0
    start_iter: int = 0  # steps already done in start_epoch (a preempted epoch)
    tb_step: int = 0  # global iteration counter, the TensorBoard x axis
    resumed_log_stats: Optional[dict] = None  # the checkpointed epoch's log line
    n_parameters: int = 0  # trainable parameters (log.txt, as DETR)
    resumed_metrics: Optional[dict] = None  # the named COCO metrics of the checkpoint's last evaluation
    class_names: Optional[dict] = None  # {category id: name} of the dataset, stored in checkpoints
    stuff_ids: Optional[list] = None  # --masks: the panoptic set's stuff category ids, stored in checkpoints

    @property
    def output_dir(self) -> Optional[Path]:
        return self.folder.path if self.folder is not None else None

    @property
    def writes(self) -> bool:
        return self.folder is not None and dist.is_main_process()

    def save(self, name: str, epoch: int, iteration: int = 0, log_stats: Optional[dict] = None,
             metrics: Optional[dict] = None) -> None:
        """Atomic checkpoint; ``iteration`` > 0 marks a preempted epoch (resume continues it);
        ``log_stats`` is the epoch's log.txt line (restored on resume if the line never reached the file);
        ``metrics`` the last evaluation's named COCO metrics (finished.json of a resumed run needs them)."""
        if not self.writes:
            return
        self.folder.check()
        state = {"model": self.model_without_ddp.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.lr_scheduler.state_dict(), "epoch": epoch, "iteration": iteration,
                 "config": self.config, "rng": ckpt.rng_state(), "tb_step": self.tb_step,
                 "log_stats": log_stats, "metrics": metrics or {}, "class_names": self.class_names,
                 "stuff_ids": self.stuff_ids}
        ckpt.atomic_save(state, self.output_dir / name)

    def write_json(self, name: str, obj) -> None:
        """A whole JSON file, atomically (finished.json, config.json)."""
        if self.writes:
            self.folder.check()
            ckpt.atomic_write_text(self.output_dir / name, json.dumps(obj, sort_keys=True) + "\n", what=name)

    def log_line(self, log_stats: dict) -> None:
        if self.writes:
            self.folder.check()
            ckpt.append_line(self.output_dir / "log.txt", json.dumps(log_stats, sort_keys=True), what="log")

    def restore(self, checkpoint: dict, path: str, explicit) -> None:
        """Continue a run: optimizer, scheduler, position and RNG from ``checkpoint``."""
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
        _apply_overrides(self.optimizer, self.lr_scheduler, self.args, explicit)
        self.start_iter = checkpoint.get("iteration", 0)
        # a preempted epoch continues where it stopped; a finished one is followed by the next
        self.start_epoch = checkpoint["epoch"] + (0 if self.start_iter else 1)
        self.tb_step = checkpoint.get("tb_step", 0)
        self.resumed_log_stats = checkpoint.get("log_stats")
        self.resumed_metrics = checkpoint.get("metrics")
        if "rng" in checkpoint:
            ckpt.set_rng_state(checkpoint["rng"])
        print(f"resumed from {path} at epoch {self.start_epoch}"
              + (f", iteration {self.start_iter}" if self.start_iter else ""))


def _log_epoch(line: str) -> Optional[int]:
    """The epoch of a log.txt line; None for a line torn by a kill or a full disk."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry.get("epoch", -1) if isinstance(entry, dict) else None


def _truncate_log(path: Path, start_epoch: int, checkpointed: Optional[dict] = None) -> None:
    """Make log.txt hold exactly the epochs before ``start_epoch``: drop lines of epochs this run will
    (re)do and torn lines, and add the checkpointed epoch's line (``checkpointed``) if a stop came before
    it was written. Rewritten atomically, so a failure here loses no line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    torn = [line for line in lines if _log_epoch(line) is None]
    if torn:
        print(f"dropping {len(torn)} torn line(s) of {path} (a write that did not finish)")
    kept = [line for line in lines if _log_epoch(line) is not None and _log_epoch(line) < start_epoch]
    epochs = {_log_epoch(line) for line in kept}
    if checkpointed is not None and checkpointed.get("epoch") not in epochs and checkpointed["epoch"] < start_epoch:
        kept.append(json.dumps(checkpointed, sort_keys=True))
    if kept != lines:
        ckpt.atomic_write_text(path, "".join(line + "\n" for line in kept), what="log")


def main(args, explicit=frozenset()):
    """Run training or evaluation. ``explicit``: the flag names the user passed (see rundir.checkpoint)."""
    if args.device is None:  # a namespace parsed without check_args (slurm/common.py)
        args.device = default_device()
    dist.init_distributed_mode(args)
    print(f"world size: {dist.get_world_size()} (rank {dist.get_rank()})")
    if args.device == "cpu" and dist.get_world_size() > 1:
        # CPU processes of one job share the node's cores; oversubscribed OpenMP threads thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    folder = None
    if args.output_dir:
        # before anything is written there: one live run per folder, finished runs stay as they are
        folder = run_folder.claim(args)
        if folder is None:
            return {}
    try:
        return _run(args, explicit, folder)
    finally:
        if folder is not None:
            folder.release()
        if args.compile:
            print(compile_report())


def _run(args, explicit, folder: Optional[run_folder.RunFolder]):
    device = torch.device(args.device)
    datasets.check_paths(args, ("val",) if args.eval else ("train", "val"))
    resume_path = _resume_path(args)
    checkpoint = ckpt.load_checkpoint(resume_path, trust=args.trust_checkpoint) if resume_path else None
    if args.eval and checkpoint is None and not args.finetune_from and not args.eval_untrained:
        raise UserError(f"--eval --resume auto: no checkpoint.pth in {args.output_dir} to evaluate; pass "
                        f"--resume PATH, or --eval_untrained to score the untrained model on purpose")
    if checkpoint is not None:
        for message in _adopt_architecture(args, explicit, checkpoint, resume_path):
            print(message)
    # DETR's second stage: the detector of a box checkpoint, frozen; --masks is what this run adds
    frozen = ckpt.load_checkpoint(args.frozen_weights, trust=args.trust_checkpoint) if args.frozen_weights else None
    if frozen is not None:
        for message in _adopt_architecture(args, explicit, frozen, args.frozen_weights, ignore={"masks"}):
            print(message)
    resolve_args(args)
    # every annotation file the run reads, before any model is built (docs/data-checks.md); after the flags a
    # checkpoint sets (--masks decides whether masks are scored)
    datasets.check_data(args, ("val",) if args.eval else ("train", "val"))
    config = run_config.config_to_dict(args)
    print(format_config(args))
    print(ablation_summary(args))

    seed_everything(args.seed + dist.get_rank())
    weights = "none" if (checkpoint is not None or frozen is not None or args.finetune_from) else args.backbone_weights
    stuff_ids = datasets.stuff_ids(args) if args.masks else None  # the panoptic post-processor merges stuff
    model, criterion, postprocessors = build_model(args, backbone_weights=weights, stuff_ids=stuff_ids)
    model.to(device)
    model_without_ddp = model
    if frozen is not None:
        detector = model_weights.detector_weights(frozen["model"])
        for line in model_weights.load_model_weights(model_without_ddp.detr, detector):
            print(line)
    if args.finetune_from:
        source = ckpt.load_checkpoint(args.finetune_from, trust=args.trust_checkpoint)
        for line in model_weights.finetune_weights(model_without_ddp, source["model"]):
            print(line)
    if checkpoint is not None:
        model_weights.load_model_weights(model_without_ddp, checkpoint["model"])
    model = accelerate(model, args.channels_last, args.compile)
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == "cuda" else None)
    n_parameters = sum(p.numel() for p in model_without_ddp.parameters() if p.requires_grad)
    print(f"number of params: {n_parameters}")

    dataset_val = datasets.build_dataset("val", args)
    datasets.check_split(dataset_val, "val", need_annotations=True)
    base_ds = datasets.get_coco_api_from_dataset(dataset_val)
    if args.eval:
        loader_val = SignalSafeLoader(dataset_val, batch_size=args.batch_size, collate_fn=_collate(args),
                                      num_workers=args.num_workers, sampler=_val_sampler(dataset_val))
        evaluator = engine.coco_evaluator(base_ds, postprocessors, args.coco_backend)
        stats, _ = engine.evaluate(model, criterion, postprocessors, loader_val, base_ds, device, amp=args.amp,
                                   coco_backend=args.coco_backend, voc_metric=datasets.uses_voc_metric(dataset_val),
                                   evaluator=evaluator)
        if folder is not None and dist.is_main_process():
            folder.prepare()
            ckpt.atomic_write_text(folder.path / "eval.json", json.dumps(stats), what="eval.json")
            if args.save_detections:
                _save_detections(evaluator.detections(), folder.path / "detections.json")
        return stats

    optimizer = torch.optim.AdamW(_param_groups(model_without_ddp, args), lr=args.lr,
                                  weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    trainer = Trainer(args, config, model, model_without_ddp, criterion, postprocessors, optimizer, lr_scheduler,
                      device, folder, start_epoch=args.start_epoch, n_parameters=n_parameters,
                      class_names=datasets.class_names_of(dataset_val),
                      stuff_ids=None if stuff_ids is None else sorted(stuff_ids))
    if checkpoint is not None and "optimizer" in checkpoint and "lr_scheduler" in checkpoint:
        trainer.restore(checkpoint, resume_path, explicit)
    elif checkpoint is not None:
        print(f"loaded weights only: epoch {trainer.start_epoch}, fresh optimizer and schedule "
              f"({resume_path} holds no optimizer state)")
    dataset_train = datasets.build_dataset("train", args)
    datasets.check_split(dataset_train, "train")
    loaders = _loaders(args, dataset_train, dataset_val)
    diag_batch = next(iter(DataLoader(dataset_val, batch_size=min(2, len(dataset_val)),
                                      collate_fn=_collate(args))))[0]
    # every input is checked: from here on the run writes (and --overwrite deletes the previous run)
    if trainer.writes:
        # AdamW keeps two tensors per parameter (exp_avg, exp_avg_sq)
        checkpoint_space.check_free_space(folder.path, checkpoint_space.checkpoint_bytes(model_without_ddp, 2))
        folder.prepare()
        ckpt.atomic_write_text(folder.path / "config.json", json.dumps(config, indent=1, sort_keys=True),
                               what="config.json")
        # what an interrupted attempt logged past the checkpoint (or, with none, at all) is redone
        _truncate_log(folder.path / "log.txt", trainer.start_epoch, trainer.resumed_log_stats)
    elif folder is None and dist.is_main_process():
        # on stdout, with the progress: stderr stays the one line of an error
        print("no --output_dir: nothing of this run will be saved")
    # a resumed run with nothing left to train or evaluate adds no (empty) events file
    idle = trainer.start_epoch >= args.epochs and _evaluated(trainer.resumed_log_stats)
    logger = RunLogger(None if idle else args.output_dir, enabled=dist.is_main_process(),
                       purge_step=trainer.tb_step)
    logger.log_hparams(config, {})
    # under submitit, its own handler checkpoints and requeues (via slurm/submit.py's checkpoint()); Ctrl-C is ours
    submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    preemption = PreemptionHandler(signals=tuple(sig for sig in STOP_SIGNALS
                                                 if not (submitit and sig in PREEMPTION_SIGNALS)))
    try:
        return train(trainer, loaders, diag_batch, base_ds, logger, preemption)
    finally:
        preemption.uninstall()
        logger.close()


def _save_detections(detections: list, path: Path) -> None:
    """COCO results JSON (a list of {image_id, category_id, bbox [x, y, w, h], score}), written atomically."""
    ckpt.atomic_write_text(path, json.dumps(detections), what=path.name)
    print(f"wrote {len(detections)} detections of {len({d['image_id'] for d in detections})} images to {path}")


def _stop_for_requeue(trainer: Trainer, preemption, epoch: int, iteration: int, logger, metrics: dict,
                      log_stats: Optional[dict] = None) -> None:
    trainer.save("checkpoint.pth", epoch, iteration=iteration, log_stats=log_stats, metrics=metrics)
    logger.close()
    preemption.uninstall()
    # SystemExit below: main() releases the folder on its way out
    if preemption.interrupted:  # Ctrl-C: the user stopped it, nothing to requeue
        if dist.is_main_process():
            # where a resume continues: the next epoch's start after a finished epoch
            at = f"epoch {epoch}, iteration {iteration}" if iteration else f"epoch {epoch + 1}, iteration 0"
            saved = ("checkpoint saved; continue with --resume auto" if trainer.writes
                     else "nothing saved (no --output_dir)")
            print(f"interrupted at {at}; {saved}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPT_EXIT_CODE)
    where = f"epoch {epoch}, iteration {iteration}" if iteration else f"the end of epoch {epoch}"
    print(f"{preemption.signal_name}: saved checkpoint at {where}")
    exit_for_requeue(dist.get_rank())


def train(trainer: Trainer, loaders: Loaders, diag_batch, base_ds, logger, preemption) -> dict:
    """The epoch loop: train, evaluate, log, checkpoint (after the epoch's logs, so a resumed run
    redoes an epoch whose logs may be partial, and drops them first)."""
    args, device = trainer.args, trainer.device
    sampler_train, loader_train, loader_val = loaders.sampler_train, loaders.train, loaders.val
    voc_metric = datasets.uses_voc_metric(loader_val.dataset)
    print("start training")
    start_time = time.time()
    test_stats = {}
    # the last evaluation's metrics, carried by checkpoints: a resumed run that evaluates no more still has them
    metrics = dict(trainer.resumed_metrics or {})
    if 0 < trainer.start_epoch >= args.epochs and not _evaluated(trainer.resumed_log_stats):
        # the run ends with a checkpointed epoch that --eval_every skipped (--epochs lowered on resume)
        test_stats, metrics = _evaluate_last_epoch(trainer, loader_val, base_ds, logger, voc_metric)
    for epoch in range(trainer.start_epoch, args.epochs):
        epoch_start = time.time()
        start_iter = trainer.start_iter if epoch == trainer.start_epoch else 0
        # the RNG of every epoch depends only on (seed, rank, epoch): resuming at an epoch is exact
        seed_everything(args.seed + dist.get_rank() + 1000 * epoch)
        sampler_train.set_epoch(epoch)
        sampler_train.set_start(start_iter * args.batch_size)
        result = engine.train_one_epoch(
            trainer.model, trainer.criterion, loader_train, trainer.optimizer, device, epoch, args.clip_max_norm,
            logger=logger, step=trainer.tb_step, images_per_step=args.batch_size * dist.get_world_size(),
            log_every=args.log_every, max_iters=args.max_iters_per_epoch, amp=args.amp,
            skip_nonfinite=args.skip_nonfinite, should_stop=lambda: preemption.requested_on_any_rank(device),
            start_iter=start_iter)
        trainer.tb_step = result.step
        if result.stopped_at is not None:
            _stop_for_requeue(trainer, preemption, epoch, result.stopped_at, logger, metrics)
        trainer.lr_scheduler.step()

        coco_stats = None
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            test_stats, coco_stats = engine.evaluate(trainer.model, trainer.criterion, trainer.postprocessors,
                                                     loader_val, base_ds, device, amp=args.amp,
                                                     coco_backend=args.coco_backend, voc_metric=voc_metric)
            metrics = engine.final_metrics(test_stats)
        if args.dynamic_scale != "none":
            logger.log_smca(epoch, trainer.model_without_ddp.smca_diagnostics(diag_batch.to(device)))
        epoch_time = time.time() - epoch_start
        log_stats = {**{f"train_{k}": v for k, v in result.stats.items()},
                     **({f"test_{k}": v for k, v in test_stats.items()} if coco_stats is not None else {}),
                     "epoch": epoch, "n_parameters": trainer.n_parameters, "epoch_time": epoch_time,
                     "nonfinite_skipped": result.skipped,
                     # the x axis of TensorBoard's train_by_images/ (and of plot_logs.py --x images)
                     "images_seen": trainer.tb_step * args.batch_size * dist.get_world_size()}
        # order: events, checkpoint (holding the log line), log line; a stop anywhere in between resumes
        # consistently (events past the checkpoint are dropped, a missing log line comes from the checkpoint)
        if coco_stats is not None and voc_metric:
            logger.log_voc(epoch, test_stats)
        logger.log_epoch(epoch, result.stats, coco_stats, epoch_time)
        if coco_stats is not None:
            logger.log_segmentation(epoch, test_stats)
        trainer.save("checkpoint.pth", epoch, log_stats=log_stats, metrics=metrics)
        # keep a copy before each lr drop and every --save_every epochs (DETR)
        if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.save_every == 0:
            trainer.save(f"checkpoint{epoch:04}.pth", epoch, log_stats=log_stats, metrics=metrics)
        trainer.log_line(log_stats)
        if preemption.requested_on_any_rank(device):  # arrived during evaluation
            _stop_for_requeue(trainer, preemption, epoch, 0, logger, metrics, log_stats)
    logger.log_hparams(trainer.config, metrics)
    trainer.write_json("finished.json", {"epochs": args.epochs, "metrics": metrics})
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    return test_stats


def _evaluated(log_stats: Optional[dict]) -> bool:
    return any(key.startswith("test_") for key in log_stats or {})


def _evaluate_last_epoch(trainer: Trainer, loader_val, base_ds, logger, voc_metric: bool) -> tuple[dict, dict]:
    """Evaluate the checkpointed last epoch; its checkpoint, log.txt line and events get the results."""
    args, epoch = trainer.args, trainer.start_epoch - 1
    print(f"epoch {epoch} is the last and was not evaluated: evaluating it")
    test_stats, coco_stats = engine.evaluate(trainer.model, trainer.criterion, trainer.postprocessors, loader_val,
                                             base_ds, trainer.device, amp=args.amp, coco_backend=args.coco_backend,
                                             voc_metric=voc_metric)
    metrics = engine.final_metrics(test_stats)
    log_stats = {**(trainer.resumed_log_stats or {"epoch": epoch}), **{f"test_{k}": v for k, v in test_stats.items()}}
    if voc_metric:
        logger.log_voc(epoch, test_stats)
    logger.log_coco(epoch, coco_stats)
    logger.log_segmentation(epoch, test_stats)
    trainer.save("checkpoint.pth", epoch, log_stats=log_stats, metrics=metrics)
    if trainer.writes:  # the epoch's line without test_ keys goes, the evaluated one takes its place
        _truncate_log(trainer.output_dir / "log.txt", epoch)
        trainer.log_line(log_stats)
    return test_stats, metrics


def _one_line(message: str) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback; keep the
    original message (the last line, without the exception's type name)."""
    if "DataLoader worker" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_main(argv)
    parser = main_parser()
    try:
        main(args, run_config.explicit_flags(parser, argv))
    except UserError as exc:
        # one line per finding (the annotation check can report several)
        print("\n".join(f"error: {line}" for line in _one_line(str(exc)).splitlines()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before training's handler is installed (or in --eval)
        print("interrupted before training started; nothing saved", file=sys.stderr)
        return INTERRUPT_EXIT_CODE
    finally:
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
