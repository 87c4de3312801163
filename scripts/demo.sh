#!/usr/bin/env bash
# The main job on the embedded synthetic dataset: installs what it needs, trains a small SMCA-DETR on CPU
# (ResNet-18 from scratch with trainable BatchNorm, type2 scales + query mixture, focal loss) and prints
# COCO AP (faster-coco-eval, printed as pycocotools prints it). Under 10 minutes on 2 CPU cores. Extra flags are passed to main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
exec "$PY" main.py --dataset_file synthetic --output_dir outputs/demo \
  --backbone resnet18 --backbone_weights none --backbone_norm batch \
  --hidden_dim 128 --nheads 8 --dim_feedforward 256 --enc_layers 2 --dec_layers 2 --num_queries 20 \
  --dropout 0.0 --dynamic_scale type2 --query_mixture \
  --lr 5e-4 --lr_backbone 5e-4 --batch_size 8 --epochs 20 --lr_drop 16 --eval_every 4 \
  --num_workers 1 --log_every 16 --device cpu "$@"
