"""RunLogger: what it writes is read back exactly by TensorBoard's reader and by a real TensorBoard server."""
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata

from util.tb import COCO_METRIC_NAMES, RunLogger

ITERS_PER_EPOCH = 5
IMAGES_PER_ITER = 6  # batch 2 x 3 GPUs
CONFIG = {
    "lr": 1e-4,
    "epochs": 4,
    "dynamic_scale": "type2",
    "query_mixture": True,
    "masks": False,
    "num_classes": None,
    "lr_drops": [2, 3],
}
# How TensorBoard's HPARAMS data should carry CONFIG: numbers as doubles, None and lists as text.
EXPECTED_HPARAMS = {
    "lr": ("number_value", 1e-4),
    "epochs": ("number_value", 4.0),
    "dynamic_scale": ("string_value", "type2"),
    "query_mixture": ("bool_value", True),
    "masks": ("bool_value", False),
    "num_classes": ("string_value", "None"),
    "lr_drops": ("string_value", "[2, 3]"),
}


def iter_scalars(it, tag_value=0.0):
    """Deterministic per-iteration values; tag_value shifts them so two writers can be told apart."""
    return {
        "loss": 10.0 / (it + 3) + tag_value,
        "loss_ce": 1.0 / (it + 7) + tag_value,
        "lr_group0": 1e-4,
        "grad_norm": math.sqrt(it + 2) + tag_value,
    }


def coco_stats(epoch, tag_value=0.0):
    return [0.01 * (epoch + 1) * (i + 1) / 3 + tag_value for i in range(len(COCO_METRIC_NAMES))]


def epoch_time(epoch, tag_value=0.0):
    return 60.0 + epoch / 7 + tag_value


def log_epochs(logger, epochs, tag_value=0.0, last_epoch_partial=False):
    """Log whole epochs like the engine does; a partial last epoch stops mid-way with no epoch log."""
    for epoch in epochs:
        n_iters = ITERS_PER_EPOCH // 2 if last_epoch_partial and epoch == epochs[-1] else ITERS_PER_EPOCH
        for i in range(n_iters):
            it = epoch * ITERS_PER_EPOCH + i
            logger.log_iter(it, (it + 1) * IMAGES_PER_ITER, iter_scalars(it, tag_value))
        if n_iters == ITERS_PER_EPOCH:
            logger.log_epoch(epoch, {"loss": 1.0 / (epoch + 2) + tag_value}, coco_stats(epoch, tag_value),
                             epoch_time(epoch, tag_value))


def load(run_dir):
    acc = event_accumulator.EventAccumulator(run_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    return acc


def series(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def assert_series(acc, tag, expected):
    """expected: [(step, float)], compared at float32 precision (TensorBoard stores simple_value as float32)."""
    got = series(acc, tag)
    assert [s for s, _ in got] == [s for s, _ in expected], tag
    np.testing.assert_array_equal(np.array([v for _, v in got], dtype=np.float32),
                                  np.array([v for _, v in expected], dtype=np.float32), err_msg=tag)


def assert_only_event_files(run_dir):
    entries = os.listdir(run_dir)
    assert entries and all(e.startswith("events.out.tfevents.") for e in entries), entries
    assert not any(os.path.isdir(os.path.join(run_dir, e)) for e in entries)


def wait_for_next_second():
    """Event file names start with whole seconds; a resumed writer must sort after the first one, as it does
    in real use where a resume happens in a later process."""
    start = int(time.time())
    while int(time.time()) == start:
        time.sleep(0.02)


def test_scalars_read_back_on_every_axis(tmp_path):
    run_dir = str(tmp_path / "run")
    logger = RunLogger(run_dir)
    log_epochs(logger, [0, 1])
    logger.close()

    acc = load(run_dir)
    iters = range(2 * ITERS_PER_EPOCH)
    for name in iter_scalars(0):
        assert_series(acc, f"train/{name}", [(it, iter_scalars(it)[name]) for it in iters])
        assert_series(acc, f"train_by_images/{name}",
                      [((it + 1) * IMAGES_PER_ITER, iter_scalars(it)[name]) for it in iters])
    # Epoch-axis step = epochs done.
    assert_series(acc, "epoch/train_loss", [(1, 1.0 / 2), (2, 1.0 / 3)])
    assert_series(acc, "epoch/time", [(1, epoch_time(0)), (2, epoch_time(1))])
    for i, name in enumerate(COCO_METRIC_NAMES):
        assert_series(acc, f"coco/{name}", [(1, coco_stats(0)[i]), (2, coco_stats(1)[i])])
    expected_tags = (
        {f"train/{n}" for n in iter_scalars(0)} | {f"train_by_images/{n}" for n in iter_scalars(0)}
        | {"epoch/train_loss", "epoch/time"} | {f"coco/{n}" for n in COCO_METRIC_NAMES}
    )
    assert set(acc.Tags()["scalars"]) == expected_tags
    assert_only_event_files(run_dir)


@pytest.mark.quick
def test_smca_histograms_and_means(tmp_path):
    run_dir = str(tmp_path / "run")
    scale = torch.tensor([[0.5, 1.5], [2.0, 4.0]])
    offset_norm = torch.tensor([0.25, 0.75, 2.0])
    logger = RunLogger(run_dir)
    logger.log_smca(2, {"layer0/scale": scale, "layer0/offset_norm": offset_norm,
                        "layer1/scale": torch.tensor([1.0, float("nan"), 3.0])})
    logger.close()

    acc = load(run_dir)
    assert set(acc.Tags()["histograms"]) == {"smca/layer0/scale", "smca/layer1/scale"}
    (hist,) = acc.Histograms("smca/layer0/scale")
    assert hist.step == 3
    assert hist.histogram_value.num == 4
    assert hist.histogram_value.sum == pytest.approx(8.0)
    assert (hist.histogram_value.min, hist.histogram_value.max) == (0.5, 4.0)
    assert_series(acc, "smca/layer0/scale_mean", [(3, 2.0)])
    assert_series(acc, "smca/layer0/offset_norm", [(3, 1.0)])
    # A NaN is left out of the histogram but shows in the mean.
    (hist1,) = acc.Histograms("smca/layer1/scale")
    assert hist1.histogram_value.num == 2
    (mean1,) = acc.Scalars("smca/layer1/scale_mean")
    assert math.isnan(mean1.value)


def read_hparams(acc):
    content = acc.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    start = hparams_metadata.parse_session_start_info_plugin_data(
        content[hparams_metadata.SESSION_START_INFO_TAG])
    experiment = hparams_metadata.parse_experiment_plugin_data(content[hparams_metadata.EXPERIMENT_TAG])
    hparams = {name: (value.WhichOneof("kind"), getattr(value, value.WhichOneof("kind")))
               for name, value in start.hparams.items()}
    return content, hparams, experiment


@pytest.mark.quick
def test_hparams_in_the_run_folder(tmp_path):
    run_dir = str(tmp_path / "run")
    logger = RunLogger(run_dir)
    logger.log_hparams(CONFIG, {})

    # Start of training: flags and the declared metric tags, no session end, no metric values yet.
    logger.flush()
    content, hparams, experiment = read_hparams(load(run_dir))
    assert hparams == EXPECTED_HPARAMS
    assert {info.name.tag for info in experiment.metric_infos} == {f"hparams/{n}" for n in COCO_METRIC_NAMES}
    assert {info.name for info in experiment.hparam_infos} == set(CONFIG)
    assert hparams_metadata.SESSION_END_INFO_TAG not in content

    log_epochs(logger, [0, 1])
    final = {"AP": 0.4321, "AP50": 0.61}
    logger.log_hparams(CONFIG, final)
    logger.close()

    acc = load(run_dir)
    content, hparams, _ = read_hparams(acc)
    assert hparams == EXPECTED_HPARAMS
    end = hparams_metadata.parse_session_end_info_plugin_data(content[hparams_metadata.SESSION_END_INFO_TAG])
    assert end.status == api_pb2.STATUS_SUCCESS
    assert_series(acc, "hparams/AP", [(2, 0.4321)])
    assert_series(acc, "hparams/AP50", [(2, 0.61)])
    assert_only_event_files(run_dir)


@pytest.mark.parametrize("output_dir,enabled", [("", True), (None, True), ("run", False)])
def test_disabled_logger_writes_nothing(tmp_path, output_dir, enabled):
    run_dir = str(tmp_path / output_dir) if output_dir else output_dir
    logger = RunLogger(run_dir, enabled=enabled)
    assert not logger.enabled
    log_epochs(logger, [0])
    logger.log_smca(0, {"layer0/scale": torch.ones(3)})
    logger.log_hparams(CONFIG, {"AP": 0.5})
    logger.flush()
    logger.close()
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("scenario", ["crash_mid_epoch", "older_checkpoint"])
def test_resume_continues_curves_without_duplicate_steps(tmp_path, scenario):
    """First session: epochs 0-1 and half of epoch 2 (crash), or epochs 0-2 completed then resumed from
    the epoch-0 checkpoint. The resumed session logs from the checkpoint to epoch 3 with shifted values."""
    run_dir = str(tmp_path / "run")
    first = RunLogger(run_dir)
    first.log_hparams(CONFIG, {})
    if scenario == "crash_mid_epoch":
        log_epochs(first, [0, 1, 2], tag_value=100.0, last_epoch_partial=True)
        resume_epoch = 2
    else:
        log_epochs(first, [0, 1, 2], tag_value=100.0)
        resume_epoch = 1
    first.close()
    # A killed job leaves a torn last record.
    (events_file,) = os.listdir(run_dir)
    with open(os.path.join(run_dir, events_file), "r+b") as f:
        f.truncate(os.path.getsize(os.path.join(run_dir, events_file)) - 3)

    wait_for_next_second()
    # purge_step is the checkpoint's last logged iteration: this test logs 0-based iterations, so the
    # checkpoint before epoch `resume_epoch` holds iterations up to resume_epoch * ITERS_PER_EPOCH - 1
    resumed = RunLogger(run_dir, purge_step=resume_epoch * ITERS_PER_EPOCH - 1)
    resumed.log_hparams(CONFIG, {})
    log_epochs(resumed, list(range(resume_epoch, 4)), tag_value=200.0)
    resumed.log_hparams(CONFIG, {"AP": 0.5})
    resumed.close()

    acc = load(run_dir)
    for tag in acc.Tags()["scalars"]:
        steps = [s for s, _ in series(acc, tag)]
        assert steps == sorted(set(steps)), tag

    def shift(it_or_epoch, boundary):
        return 100.0 if it_or_epoch < boundary else 200.0

    boundary_it = resume_epoch * ITERS_PER_EPOCH
    iters = range(4 * ITERS_PER_EPOCH)
    assert_series(acc, "train/loss", [(it, iter_scalars(it, shift(it, boundary_it))["loss"]) for it in iters])
    # The images axis keeps its whole history before the checkpoint (TensorBoard's own purge would not).
    assert_series(acc, "train_by_images/loss",
                  [((it + 1) * IMAGES_PER_ITER, iter_scalars(it, shift(it, boundary_it))["loss"]) for it in iters])
    assert_series(acc, "epoch/time", [(e + 1, epoch_time(e, shift(e, resume_epoch))) for e in range(4)])
    assert_series(acc, "coco/AP", [(e + 1, coco_stats(e, shift(e, resume_epoch))[0]) for e in range(4)])
    assert_series(acc, "hparams/AP", [(4, 0.5)])
    _, hparams, _ = read_hparams(acc)
    assert hparams == EXPECTED_HPARAMS
    assert_only_event_files(run_dir)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(base, path, **params):
    query = ("?" + urllib.parse.urlencode(params)) if params else ""
    with urllib.request.urlopen(base + path + query, timeout=10) as response:
        return json.loads(response.read())


def test_real_tensorboard_server_lists_runs_tags_and_hparams(tmp_path):
    binary = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    if not os.path.exists(binary):
        binary = shutil.which("tensorboard")
    if not binary:
        pytest.skip("tensorboard binary not installed")

    root = tmp_path / "sweep"
    final_ap = {"baseline": 0.25, "type2": 0.375}
    for name, dynamic_scale in [("baseline", "none"), ("type2", "type2")]:
        logger = RunLogger(str(root / name))
        config = {**CONFIG, "dynamic_scale": dynamic_scale}
        logger.log_hparams(config, {})
        log_epochs(logger, [0, 1])
        logger.log_hparams(config, {"AP": final_ap[name]})
        logger.close()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "tensorboard.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([binary, "--logdir", str(root), "--port", str(port), "--host", "127.0.0.1"],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        runs, deadline = [], time.monotonic() + 60
        while sorted(runs) != ["baseline", "type2"]:
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"TensorBoard did not list the runs in time: {runs}"
            try:
                runs = get_json(base, "/data/runs")
            except OSError:
                pass
            time.sleep(0.5)

        tags = get_json(base, "/data/plugin/scalars/tags")
        for run in ("baseline", "type2"):
            assert {"train/loss", "train_by_images/loss", "epoch/time", "coco/AP", "hparams/AP"} <= set(tags[run])
        points = get_json(base, "/data/plugin/scalars/scalars", run="type2", tag="coco/AP")
        assert [p[1] for p in points] == [1, 2]
        assert np.float32(points[1][2]) == np.float32(coco_stats(1)[0])

        request = {"startIndex": 0, "sliceSize": 10, "includeMetrics": True,
                   "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]}
        groups = get_json(base, "/data/plugin/hparams/session_groups", request=json.dumps(request))
        by_name = {g["name"]: g for g in groups["sessionGroups"]}
        assert sorted(by_name) == ["baseline", "type2"]
        for name, group in by_name.items():
            # One session per run, in the run's own folder, finished, with the final metric.
            assert [s["name"] for s in group["sessions"]] == [name]
            assert group["sessions"][0]["status"] == "STATUS_SUCCESS"
            assert group["hparams"]["dynamic_scale"] == ("none" if name == "baseline" else "type2")
            assert group["hparams"]["query_mixture"] is True
            ap = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}["hparams/AP"]
            assert np.float32(ap) == np.float32(final_ap[name])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
