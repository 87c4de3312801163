#!/usr/bin/env bash
# The synthetic panoptic demo: scripts/demo.sh's SMCA-DETR (ResNet-18 from scratch, type2 scales + query mixture,
# focal loss) with DETR's mask head (--masks), trained jointly on the embedded synthetic panoptic set (shapes as
# things on 2-3 stuff regions) on CPU; prints box and mask AP and PQ / SQ / RQ (panopticapi's table).
# Extra flags are passed to main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" main.py --dataset_file synthetic --masks --output_dir outputs/demo_panoptic \
  --backbone resnet18 --backbone_weights none --backbone_norm batch \
  --hidden_dim 128 --nheads 8 --dim_feedforward 256 --enc_layers 2 --dec_layers 2 --num_queries 20 \
  --dropout 0.0 --dynamic_scale type2 --query_mixture \
  --lr 5e-4 --lr_backbone 5e-4 --batch_size 8 --epochs 20 --lr_drop 16 --eval_every 4 \
  --num_workers 1 --log_every 16 --device cpu "$@"
