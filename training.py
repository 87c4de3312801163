"""Training: the run's state and files (Trainer), its data loaders, and the epoch loop (train, evaluate, log,
checkpoint; a stop signal saves and exits for a requeue). main.py builds what it needs and calls ``train``.
"""
import argparse
import datetime
import functools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import SequentialSampler
from torch.utils.data.distributed import DistributedSampler

import datasets
import engine
from rundir import checkpoint as ckpt
from rundir import checkpoint_space, run_folder
from rundir.preemption import (INTERRUPT_EXIT_CODE, PREEMPTION_SIGNALS, STOP_SIGNALS, PreemptionHandler,
                               SignalSafeLoader, exit_for_requeue)
from util import dist
from util.errors import UserError
from util.misc import collate_fn, seed_everything
from util.tb import RunLogger


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


def collate(args):
    """DETR's collate; with --fixed_size every batch is padded to that canvas (datasets/fixed_size.py)."""
    return functools.partial(collate_fn, pad_to=args.fixed_size)


def val_loader(args, dataset_val) -> SignalSafeLoader:
    """The evaluated split in order, each process its share."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sampler = (DistributedSampler(dataset_val, num_replicas=world, rank=rank, shuffle=False) if world > 1
               else SequentialSampler(dataset_val))
    # workers ignore the signals a launcher sends to the whole process group; the main process acts on them
    return SignalSafeLoader(dataset_val, batch_size=args.batch_size, sampler=sampler, drop_last=False,
                            collate_fn=collate(args), num_workers=args.num_workers, persistent_workers=False)


@dataclass
class Loaders:
    sampler_train: engine.ResumableSampler
    train: SignalSafeLoader
    val: SignalSafeLoader


def build_loaders(args, dataset_train, dataset_val) -> Loaders:
    world, rank = dist.get_world_size(), dist.get_rank()
    # a seeded DistributedSampler also for one process: the data order depends only on (seed, epoch),
    # so a resumed run sees exactly the batches a straight run would
    sampler_train = engine.ResumableSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                            seed=args.seed)
    loader_train = SignalSafeLoader(dataset_train, batch_size=args.batch_size, sampler=sampler_train, drop_last=True,
                                    collate_fn=collate(args), num_workers=args.num_workers, persistent_workers=False)
    if len(loader_train) == 0:
        raise UserError(f"the training set has {len(dataset_train)} images, fewer than --batch_size "
                        f"{args.batch_size} x {world} processes; lower --batch_size")
    return Loaders(sampler_train, loader_train, val_loader(args, dataset_val))


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


def _stop_for_requeue(trainer: Trainer, preemption, epoch: int, iteration: int, logger, metrics: dict,
                      log_stats: Optional[dict] = None) -> None:
    trainer.save("checkpoint.pth", epoch, iteration=iteration, log_stats=log_stats, metrics=metrics)
    logger.close()
    preemption.uninstall()
    # SystemExit below: main.main releases the folder on its way out
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


def train(trainer: Trainer, loaders: Loaders, diag_batch, base_ds) -> dict:
    """Train from ``trainer.start_epoch`` to --epochs, once every input is checked: from here on the run writes
    (and --overwrite deletes the previous run). ``diag_batch``: the images of the SMCA diagnostics;
    ``base_ds``: the validation set's COCO API. Returns the last evaluation's stats."""
    _prepare_folder(trainer)
    # a resumed run with nothing left to train or evaluate adds no (empty) events file
    idle = trainer.start_epoch >= trainer.args.epochs and _evaluated(trainer.resumed_log_stats)
    logger = RunLogger(None if idle else trainer.args.output_dir, enabled=dist.is_main_process(),
                       purge_step=trainer.tb_step)
    logger.log_hparams(trainer.config, {})
    # under submitit, its own handler checkpoints and requeues (via slurm/submit.py's checkpoint()); Ctrl-C is ours
    submitit = bool(os.environ.get("SUBMITIT_EXECUTOR"))
    preemption = PreemptionHandler(signals=tuple(sig for sig in STOP_SIGNALS
                                                 if not (submitit and sig in PREEMPTION_SIGNALS)))
    try:
        return _epoch_loop(trainer, loaders, diag_batch, base_ds, logger, preemption)
    finally:
        preemption.uninstall()
        logger.close()


def _prepare_folder(trainer: Trainer) -> None:
    if trainer.writes:
        # AdamW keeps two tensors per parameter (exp_avg, exp_avg_sq)
        checkpoint_space.check_free_space(trainer.output_dir,
                                          checkpoint_space.checkpoint_bytes(trainer.model_without_ddp, 2))
        trainer.folder.prepare()
        ckpt.atomic_write_text(trainer.output_dir / "config.json", json.dumps(trainer.config, indent=1,
                                                                              sort_keys=True), what="config.json")
        # what an interrupted attempt logged past the checkpoint (or, with none, at all) is redone
        _truncate_log(trainer.output_dir / "log.txt", trainer.start_epoch, trainer.resumed_log_stats)
    elif trainer.folder is None and dist.is_main_process():
        # on stdout, with the progress: stderr stays the one line of an error
        print("no --output_dir: nothing of this run will be saved")


def _epoch_loop(trainer: Trainer, loaders: Loaders, diag_batch, base_ds, logger, preemption) -> dict:
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


