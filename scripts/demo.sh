#!/usr/bin/env bash
# The main job on the embedded synthetic dataset: installs what it needs, trains a small SMCA-DETR on CPU
# (ResNet-18 from scratch with trainable BatchNorm, type2 scales + query mixture, focal loss) and prints
# COCO AP (faster-coco-eval, printed as pycocotools prints it). Under 10 minutes on 2 CPU cores. Extra flags are passed to main.py.
#   bash scripts/demo.sh --quick   a first AP in about a minute or two: fewer and smaller images, a smaller model, evaluated
#                                  once, at the end (into outputs/demo_quick); docs/first_hour.md
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
if [ "${1:-}" = "--quick" ]; then
  shift
  exec "$PY" main.py --dataset_file synthetic --output_dir outputs/demo_quick \
    --synthetic_train_size 192 --synthetic_val_size 32 --synthetic_image_size 64 \
    --backbone resnet18 --backbone_weights none --backbone_norm batch \
    --hidden_dim 64 --nheads 4 --dim_feedforward 128 --enc_layers 1 --dec_layers 2 --num_queries 12 \
    --dropout 0.0 --dynamic_scale type2 --query_mixture \
    --lr 5e-4 --lr_backbone 5e-4 --batch_size 8 --epochs 12 --lr_drop 10 --eval_every 1000 \
    --num_workers 1 --log_every 24 --device cpu "$@"
fi
exec "$PY" main.py --dataset_file synthetic --output_dir outputs/demo \
  --backbone resnet18 --backbone_weights none --backbone_norm batch \
  --hidden_dim 128 --nheads 8 --dim_feedforward 256 --enc_layers 2 --dec_layers 2 --num_queries 20 \
  --dropout 0.0 --dynamic_scale type2 --query_mixture \
  --lr 5e-4 --lr_backbone 5e-4 --batch_size 8 --epochs 20 --lr_drop 16 --eval_every 4 \
  --num_workers 1 --log_every 16 --device cpu "$@"
