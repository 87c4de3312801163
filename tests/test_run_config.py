"""Flags against a checkpoint's stored configuration (rundir/run_config.py): which flags the user passed, taking the
others from the checkpoint, and reading an official DETR checkpoint's architecture from its weights."""
import argparse

import pytest
import torch

from options import ARCH_FLAGS
from rundir.run_config import explicit_flags, infer_official_config, reconcile_config
from util.errors import UserError


# --------------------------------------------------------------------------------------------------
# Flags vs checkpoint


def small_parser():
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument('--backbone', default='resnet50')
    parser.add_argument('--dilation', action='store_true')
    parser.add_argument('--num_queries', default=100, type=int)
    parser.add_argument('--hidden_dim', default=256, type=int)
    parser.add_argument('--output_dir', default='')
    parser.add_argument('--lr', default=1e-4, type=float)
    return parser


@pytest.mark.quick
def test_explicit_flags_forms():
    parser = small_parser()
    argv = ['--dilation', '--num_queries=50', '--output_dir', 'out', '--lr', '-1e-3']
    assert explicit_flags(parser, argv) == {'dilation', 'num_queries', 'output_dir', 'lr'}
    # A value that spells another flag is a value, not that flag.
    assert explicit_flags(parser, ['--output_dir=--backbone']) == {'output_dir'}
    assert explicit_flags(parser, []) == set()


def test_reconcile_takes_unpassed_flags_and_rejects_conflicts():
    parser = small_parser()
    stored = {'backbone': 'resnet101', 'dilation': True, 'num_queries': 100, 'lr': 5.0}

    args = parser.parse_args(['--lr', '1e-5'])
    messages = reconcile_config(args, explicit_flags(parser, ['--lr', '1e-5']), stored, ARCH_FLAGS,
                                ckpt_path='run/ck.pth')
    assert (args.backbone, args.dilation, args.num_queries) == ('resnet101', True, 100)
    assert args.lr == 1e-5  # not an architecture flag: the user's value stands
    assert messages == ['taking --backbone resnet101 from the checkpoint', 'taking --dilation from the checkpoint']

    argv = ['--backbone', 'resnet50']
    args = parser.parse_args(argv)
    with pytest.raises(UserError) as info:
        reconcile_config(args, explicit_flags(parser, argv), stored, ARCH_FLAGS, ckpt_path='run/ck.pth')
    assert str(info.value) == ("--backbone resnet50 conflicts with the checkpoint's 'resnet101' (run/ck.pth); "
                               "drop the flag or pass --backbone resnet101")

    # Passing the checkpoint's own value is fine and silent.
    argv = ['--backbone', 'resnet101', '--dilation']
    args = parser.parse_args(argv)
    assert reconcile_config(args, explicit_flags(parser, argv), stored, ARCH_FLAGS, ckpt_path='x') == []


def fake_detr_state_dict(layer3_blocks, bottleneck, num_queries=7, hidden=8, enc=2, dec=3, ffn=12,
                         num_classes=5, pre_norm=False):
    """Tiny tensors under DETR's key names; only what inference reads, plus some decoys."""
    sd = {'backbone.0.body.conv1.weight': torch.zeros(4, 3, 1, 1)}
    for layer, blocks in (('layer1', 3), ('layer2', 4), ('layer3', layer3_blocks), ('layer4', 3)):
        for b in range(blocks):
            convs = ('conv1', 'conv2', 'conv3') if bottleneck else ('conv1', 'conv2')
            for conv in convs:
                sd[f'backbone.0.body.{layer}.{b}.{conv}.weight'] = torch.zeros(2, 2, 1, 1)
            sd[f'backbone.0.body.{layer}.{b}.bn1.running_mean'] = torch.zeros(2)
    for i in range(enc):
        sd[f'transformer.encoder.layers.{i}.linear1.weight'] = torch.zeros(ffn, hidden)
        sd[f'transformer.encoder.layers.{i}.self_attn.in_proj_weight'] = torch.zeros(3 * hidden, hidden)
    for i in range(dec):
        sd[f'transformer.decoder.layers.{i}.linear1.weight'] = torch.zeros(ffn, hidden)
    if pre_norm:
        sd['transformer.encoder.norm.weight'] = torch.zeros(hidden)
    sd['transformer.decoder.norm.weight'] = torch.zeros(hidden)
    sd['query_embed.weight'] = torch.zeros(num_queries, hidden)
    sd['class_embed.weight'] = torch.zeros(num_classes + 1, hidden)
    sd['input_proj.weight'] = torch.zeros(hidden, 2, 1, 1)
    return sd


def detr_args(**overrides):
    defaults = dict(backbone='resnet50', dilation=False, position_embedding='sine', hidden_dim=256, nheads=8,
                    enc_layers=6, dec_layers=6, dim_feedforward=2048, pre_norm=False, num_queries=100,
                    num_classes=None, masks=False, eval=True, batch_size=2, resume='')
    return argparse.Namespace(**{**defaults, **overrides})


@pytest.mark.parametrize('blocks,bottleneck,expected', [(6, True, 'resnet50'), (23, True, 'resnet101'),
                                                        (6, False, 'resnet34'), (2, False, 'resnet18')])
def test_infer_official_config_reads_architecture_from_weights(blocks, bottleneck, expected):
    sd = fake_detr_state_dict(blocks, bottleneck, pre_norm=True)
    args = detr_args(backbone='resnet101' if expected == 'resnet50' else 'resnet50')
    messages = infer_official_config(sd, 'detr.pth', args, explicit=set())
    assert args.backbone == expected
    assert (args.num_queries, args.hidden_dim, args.enc_layers, args.dec_layers) == (7, 8, 2, 3)
    assert (args.dim_feedforward, args.num_classes, args.pre_norm, args.nheads) == (12, 5, True, 8)
    assert args.position_embedding == 'sine' and args.masks is False
    assert f'taking --backbone {expected} from the checkpoint (inferred from its weights)' in messages


def test_infer_official_config_conflict_and_dc5():
    sd = fake_detr_state_dict(23, True)
    with pytest.raises(UserError, match="--backbone resnet50 conflicts with the checkpoint's 'resnet101' "
                                        r"\(detr-r101.pth, inferred from its weights\)"):
        infer_official_config(sd, 'detr-r101.pth', detr_args(), explicit={'backbone'})

    with pytest.raises(UserError, match='detr-r101-DC5-a2bb7f3b.pth looks like a DC5 checkpoint; add --dilation'):
        infer_official_config(sd, 'detr-r101-DC5-a2bb7f3b.pth', detr_args(), explicit=set())

    warning = ('DC5 models lose several AP with more than one image per GPU (padding); '
               'use --batch_size 1 for evaluation')
    messages = infer_official_config(sd, 'detr-r101-dc5.pth', detr_args(dilation=True, batch_size=2), set())
    assert any(warning in m for m in messages)
    messages = infer_official_config(sd, 'detr-r101-dc5.pth', detr_args(dilation=True, batch_size=1), set())
    assert not any(warning in m for m in messages)
