"""Train and evaluate DETR and its SMCA ablations. Flag names and defaults are DETR's, plus the ablation flags.

``main`` reads top-down: start the processes, claim the run folder, resolve the run's configuration
(run_setup.py), check the data, build the model, load its weights, then evaluate or train (training.py).
"""
import sys

if __name__ == "__main__":
    # --help and a flag error answer before torch and the models are imported (seconds of CPU)
    import flag_checks

    flag_checks.parse_main(sys.argv[1:])

import json  # the imports follow the early parse on purpose
import os
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import DataLoader

import datasets
import engine
import training
from models import build_model
from models.acceleration import accelerate, compile_report
from rundir import checkpoint as ckpt
from rundir import model_weights, run_folder
from rundir.preemption import INTERRUPT_EXIT_CODE
from run_setup import Resolved, get_args_parser, parse_command_line, resolve_run  # noqa: F401 (DETR's API)
from util import dist
from util.errors import UserError
from util.misc import seed_everything


def main(args, explicit=frozenset()):
    """Train or evaluate with main.py's parsed flags ``args``; ``explicit``: the flag names the user wrote
    (run_setup.parse_command_line). The folder is claimed before the configuration is resolved: resolving reads
    the folder's checkpoint (--resume auto), which only the folder's owner may, and a finished run is left alone."""
    _start_processes(args)
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


def _start_processes(args) -> None:
    """The device and this process's place in a distributed job (util/dist.py)."""
    if args.device is None:  # a namespace parsed without the checks (slurm/common.py)
        args.device = dist.default_device()
    dist.init_distributed_mode(args)
    print(f"world size: {dist.get_world_size()} (rank {dist.get_rank()})")
    if args.device == "cpu" and dist.get_world_size() > 1:
        # CPU processes of one job share the node's cores; oversubscribed OpenMP threads thrash
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))


def _run(args, explicit, folder: Optional[run_folder.RunFolder]):
    splits = ("val",) if args.eval else ("train", "val")
    datasets.check_paths(args, splits)
    run = resolve_run(args, explicit)
    # every annotation file the run reads, before any model is built (docs/data-checks.md); after the flags a
    # checkpoint sets (--masks decides whether masks are scored)
    datasets.check_data(args, splits)
    print(run.summary)

    seed_everything(args.seed + dist.get_rank())
    device = torch.device(args.device)
    stuff_ids = datasets.stuff_ids(args) if args.masks else None  # the panoptic post-processor merges stuff
    model, criterion, postprocessors = _build_model(run, stuff_ids)
    model.to(device)
    model_without_ddp = model
    _load_weights(model_without_ddp, run)
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
        return _evaluate(args, model, criterion, postprocessors, dataset_val, base_ds, device, folder)

    optimizer = torch.optim.AdamW(_param_groups(model_without_ddp, args), lr=args.lr,
                                  weight_decay=args.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)
    trainer = training.Trainer(args, run.config, model, model_without_ddp, criterion, postprocessors, optimizer,
                               lr_scheduler, device, folder, start_epoch=args.start_epoch, n_parameters=n_parameters,
                               class_names=datasets.class_names_of(dataset_val),
                               stuff_ids=None if stuff_ids is None else sorted(stuff_ids))
    _continue_run(trainer, run)
    dataset_train = datasets.build_dataset("train", args)
    datasets.check_split(dataset_train, "train")
    loaders = training.build_loaders(args, dataset_train, dataset_val)
    diag_batch = next(iter(DataLoader(dataset_val, batch_size=min(2, len(dataset_val)),
                                      collate_fn=training.collate(args))))[0]
    return training.train(trainer, loaders, diag_batch, base_ds)


def _build_model(run: Resolved, stuff_ids):
    """(model, criterion, postprocessors); the backbone's pretrained weights only when no checkpoint replaces them."""
    args = run.args
    loaded = run.checkpoint is not None or run.frozen is not None or args.finetune_from
    return build_model(args, backbone_weights="none" if loaded else args.backbone_weights, stuff_ids=stuff_ids)


def _load_weights(model, run: Resolved) -> None:
    """--frozen_weights' detector, --finetune_from's weights, or the weights of the checkpoint the run continues."""
    if run.frozen is not None:
        detector = model_weights.detector_weights(run.frozen["model"])
        for line in model_weights.load_model_weights(model.detr, detector):
            print(line)
    if run.args.finetune_from:
        source = ckpt.load_checkpoint(run.args.finetune_from, trust=run.args.trust_checkpoint)
        for line in model_weights.finetune_weights(model, source["model"]):
            print(line)
    if run.checkpoint is not None:
        model_weights.load_model_weights(model, run.checkpoint["model"])


def _param_groups(model, args):
    backbone = [p for n, p in model.named_parameters() if "backbone" in n and p.requires_grad]
    rest = [p for n, p in model.named_parameters() if "backbone" not in n and p.requires_grad]
    return [{"params": rest, "lr": args.lr}, {"params": backbone, "lr": args.lr_backbone}]


def _continue_run(trainer: training.Trainer, run: Resolved) -> None:
    """A resumed run continues its optimizer, schedule and position; a checkpoint of weights only gives those."""
    checkpoint = run.checkpoint
    if checkpoint is not None and "optimizer" in checkpoint and "lr_scheduler" in checkpoint:
        trainer.restore(checkpoint, run.resume_path, run.explicit)
    elif checkpoint is not None:
        print(f"loaded weights only: epoch {trainer.start_epoch}, fresh optimizer and schedule "
              f"({run.resume_path} holds no optimizer state)")


def _evaluate(args, model, criterion, postprocessors, dataset_val, base_ds, device, folder) -> dict:
    """--eval: score the validation split; eval.json (and --save_detections' detections.json) in --output_dir."""
    evaluator = engine.coco_evaluator(base_ds, postprocessors, args.coco_backend)
    stats, _ = engine.evaluate(model, criterion, postprocessors, training.val_loader(args, dataset_val), base_ds,
                               device, amp=args.amp, coco_backend=args.coco_backend,
                               voc_metric=datasets.uses_voc_metric(dataset_val), evaluator=evaluator)
    if folder is not None and dist.is_main_process():
        folder.prepare()
        ckpt.atomic_write_text(folder.path / "eval.json", json.dumps(stats), what="eval.json")
        if args.save_detections:
            _save_detections(evaluator.detections(), folder.path / "detections.json")
    return stats


def _save_detections(detections: list, path: Path) -> None:
    """COCO results JSON (a list of {image_id, category_id, bbox [x, y, w, h], score}), written atomically."""
    ckpt.atomic_write_text(path, json.dumps(detections), what=path.name)
    print(f"wrote {len(detections)} detections of {len({d['image_id'] for d in detections})} images to {path}")


def _one_line(message: str) -> str:
    """A UserError raised in a DataLoader worker comes back wrapped with the worker's traceback; keep the
    original message (the last line, without the exception's type name)."""
    if "DataLoader worker" not in message:
        return message
    last = message.strip().splitlines()[-1]
    return last.split("UserError: ", 1)[-1]


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, explicit = parse_command_line(argv)
    try:
        main(args, explicit)
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
