"""Checkpoint safety (atomic writes, refusing code in pickles), weights into a model, RNG resume.

Flags against a checkpoint: tests/test_run_config.py; preemption: tests/test_preemption.py."""
import argparse
import errno
import functools
import http.server
import json
import os
import pathlib
import random
import shlex
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from rundir.checkpoint import atomic_save, load_checkpoint, rng_state, set_rng_state
from rundir.model_weights import finetune_weights, load_model_weights
from rundir.run_config import config_to_dict
from util.errors import UserError

def assert_same(a, b):
    """Recursive equality for nested dicts/lists of tensors and plain values."""
    assert type(a) is type(b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


# --------------------------------------------------------------------------------------------------
# atomic_save


@pytest.mark.parametrize('failure', [OSError(errno.ENOSPC, 'No space left on device'), KeyboardInterrupt()])
def test_interrupted_write_keeps_previous_checkpoint(tmp_path, monkeypatch, failure):
    path = tmp_path / 'checkpoint.pth'
    old = {'epoch': 3, 'model': {'w': torch.arange(6.0).reshape(2, 3)}}
    atomic_save(old, str(path))

    def save_then_fail(obj, f, *a, **k):
        f.write(b'PK\x03\x04 half a zip archive')
        f.flush()
        raise failure

    monkeypatch.setattr(torch, 'save', save_then_fail)
    expected = UserError if isinstance(failure, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info:
        atomic_save({'epoch': 4, 'model': {'w': torch.zeros(2, 3)}}, str(path))
    if expected is UserError:
        assert str(path) in str(info.value) and 'No space left on device' in str(info.value)
    monkeypatch.undo()

    assert os.listdir(tmp_path) == ['checkpoint.pth']
    assert_same(load_checkpoint(str(path)), old)


@pytest.mark.quick
def test_atomic_save_replaces_and_honours_umask(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    atomic_save({'epoch': 1}, str(path))
    atomic_save({'epoch': 2}, path)  # a Path works too
    assert load_checkpoint(str(path)) == {'epoch': 2}
    umask = os.umask(0)
    os.umask(umask)
    # Same permissions as a plain torch.save, not tempfile's owner-only 0o600.
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert os.listdir(tmp_path) == ['checkpoint.pth']


def test_atomic_save_unwritable_folder_is_user_error(tmp_path):
    path = tmp_path / 'missing_dir' / 'checkpoint.pth'
    with pytest.raises(UserError, match='could not write checkpoint .*missing_dir/checkpoint.pth .*No such file'):
        atomic_save({'epoch': 1}, str(path))


# --------------------------------------------------------------------------------------------------
# load_checkpoint


class _TouchMarker:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {shlex.quote(str(self.marker))}',)


@pytest.mark.parametrize('zip_format', [True, False])
def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, zip_format):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    torch.save({'model': {'w': torch.ones(1)}, 'extra': _TouchMarker(marker)}, path,
               _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UserError, match='--trust_checkpoint') as info:
        load_checkpoint(str(path))
    assert 'system' in str(info.value) and 'evil.pth' in str(info.value)
    assert not marker.exists()

    # The file really is an exploit: trusting it runs the command.
    load_checkpoint(str(path), trust=True)
    assert marker.exists()


@pytest.mark.parametrize('zip_format', [True, False])
def test_official_like_checkpoint_with_namespace_loads_without_trust(tmp_path, zip_format):
    # DETR's released files (legacy format, torch 1.5) pickle the training Namespace under 'args'.
    path = tmp_path / 'detr-r50-e632da11.pth'
    args = argparse.Namespace(backbone='resnet50', lr=1e-4, frozen_weights=None, dilation=False)
    weights = {'query_embed.weight': torch.randn(4, 3)}
    torch.save({'model': weights, 'args': args}, path, _use_new_zipfile_serialization=zip_format)

    loaded = load_checkpoint(str(path))
    assert isinstance(loaded['args'], argparse.Namespace) and vars(loaded['args']) == vars(args)
    assert torch.equal(loaded['model']['query_embed.weight'], weights['query_embed.weight'])


def test_url_offline_is_user_error_quickly(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    url = 'https://127.0.0.1:9/detr.pth'  # discard port, nothing listens: connection refused
    start = time.monotonic()
    with pytest.raises(UserError) as info:
        load_checkpoint(url)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert message.startswith(f'could not download {url} (')
    assert message.endswith('download it elsewhere and pass the local path with --resume PATH')
    assert 'refused' in message.lower()


def test_url_download_is_cached_and_still_refuses_code(tmp_path, monkeypatch):
    served = tmp_path / 'served'
    served.mkdir()
    marker = tmp_path / 'pwned'
    torch.save({'model': {'w': torch.ones(2)}, 'args': argparse.Namespace(lr=0.1)}, served / 'detr.pth')
    torch.save({'model': {}, 'extra': _TouchMarker(marker)}, served / 'evil.pth')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    base = f'http://127.0.0.1:{server.server_address[1]}'
    try:
        loaded = load_checkpoint(f'{base}/detr.pth')
        assert torch.equal(loaded['model']['w'], torch.ones(2)) and loaded['args'].lr == 0.1
        assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'detr.pth').is_file()
        with pytest.raises(UserError, match=r'evil.pth \(downloaded from .*--trust_checkpoint'):
            load_checkpoint(f'{base}/evil.pth')
        assert not marker.exists()
    finally:
        server.shutdown()
        server.server_close()


def test_truncated_missing_and_non_dict_files(tmp_path):
    good = tmp_path / 'good.pth'
    torch.save({'model': {'w': torch.randn(64, 64)}}, good)
    for name, data in [('truncated.pth', good.read_bytes()[:2000]), ('empty.pth', b''),
                       ('text.pth', b'not a checkpoint at all\n' * 20)]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=f'could not load checkpoint .*{name} .*truncated, corrupt'):
            load_checkpoint(str(tmp_path / name))
    with pytest.raises(UserError, match='nowhere.pth does not exist'):
        load_checkpoint(str(tmp_path / 'nowhere.pth'))
    torch.save([1, 2], tmp_path / 'list.pth')
    with pytest.raises(UserError, match='list.pth holds a list, not a checkpoint dict'):
        load_checkpoint(str(tmp_path / 'list.pth'))


# --------------------------------------------------------------------------------------------------
# Weights into a model


class TinyDetector(nn.Module):
    def __init__(self, num_layers=8, width=4, num_classes=3):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(num_layers))
        self.class_embed = nn.Linear(width, num_classes + 1)


def test_load_model_weights_short_mismatch_summary():
    model = TinyDetector(num_layers=8)
    sd = TinyDetector(num_layers=4, num_classes=90).state_dict()  # layers 4..7 missing: 8 keys
    sd.update({f'extra.{i}.weight': torch.zeros(1) for i in range(6)})
    with pytest.raises(UserError) as info:
        load_model_weights(model, sd)
    message = str(info.value)
    assert '8 missing, 6 unexpected, 2 with another shape' in message
    assert 'missing: layers.4.weight, layers.4.bias, layers.5.weight, layers.5.bias, layers.6.weight, ... (3 more)' \
        in message
    assert 'layers.7' not in message
    assert message.count('extra.') == 5 and 'extra.4.weight, ... (1 more)' in message
    assert 'class_embed.weight (91, 4) vs (4, 4)' in message
    assert '--num_classes' in message


def test_load_model_weights_exact_and_ddp_prefix():
    source, model = TinyDetector(), TinyDetector()
    load_model_weights(model, {f'module.{k}': v for k, v in source.state_dict().items()})
    assert_same(model.state_dict(), source.state_dict())


def test_finetune_keeps_fresh_class_head_and_lists_it():
    torch.manual_seed(0)
    coco = TinyDetector(num_classes=90)
    sd = dict(coco.state_dict())
    sd['query_embed.weight'] = torch.zeros(2, 4)
    model = TinyDetector(num_classes=3)
    fresh_head = {k: v.clone() for k, v in model.class_embed.state_dict().items()}

    messages = finetune_weights(model, sd)
    for k, v in model.layers.state_dict().items():
        assert torch.equal(v, sd[f'layers.{k}'])
    for k, v in model.class_embed.state_dict().items():
        assert torch.equal(v, fresh_head[k])
    assert messages == [
        'kept fresh initialisation for class_embed.weight: checkpoint (91, 4) vs model (4, 4)',
        'kept fresh initialisation for class_embed.bias: checkpoint (91,) vs model (4,)',
        '1 checkpoint keys not used by the model: query_embed.weight',
    ]


# --------------------------------------------------------------------------------------------------
# RNG and full checkpoint round trip


def draws():
    return ([random.random() for _ in range(3)] + [random.gauss(0, 1)],
            np.random.rand(3).tolist() + [float(np.random.standard_normal())],
            torch.rand(3))


def test_rng_round_trip_through_weights_only_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in both generators' state
    np.random.standard_normal()
    atomic_save({'rng': rng_state()}, str(tmp_path / 'c.pth'))
    expected = draws()

    random.seed(10)
    np.random.seed(11)
    torch.manual_seed(12)
    set_rng_state(load_checkpoint(str(tmp_path / 'c.pth'))['rng'])
    got = draws()
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_training_checkpoint_round_trips_without_trust(tmp_path):
    model = TinyDetector()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    loss = sum(p.sum() for p in model.parameters())
    loss.backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 200)
    args = argparse.Namespace(lr=1e-4, backbone='resnet50', output_dir=pathlib.Path('/runs/a'),
                              lr_drop=(200, 250), device=torch.device('cpu'), frozen_weights=None)
    saved = {'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
             'lr_scheduler': scheduler.state_dict(), 'epoch': 7, 'config': config_to_dict(args),
             'rng': rng_state(), 'tb_step': 1234}
    atomic_save(saved, str(tmp_path / 'checkpoint.pth'))
    loaded = load_checkpoint(str(tmp_path / 'checkpoint.pth'))
    assert_same(loaded['model'], saved['model'])
    assert_same(loaded['optimizer'], saved['optimizer'])
    assert loaded['config'] == {'lr': 1e-4, 'backbone': 'resnet50', 'output_dir': '/runs/a',
                                'lr_drop': [200, 250], 'frozen_weights': None}
    assert json.loads(json.dumps(loaded['config'])) == loaded['config']
    assert (loaded['epoch'], loaded['tb_step']) == (7, 1234)
