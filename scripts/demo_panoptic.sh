#!/usr/bin/env bash
# The synthetic panoptic demo, DETR's two-stage recipe on CPU (docs/panoptic.md):
#   1. boxes: scripts/demo.sh's SMCA-DETR (ResNet-18 from scratch, type2 scales + query mixture, focal loss) trained
#      on the synthetic panoptic set's things and stuff as boxes (--dataset_file synthetic_panoptic);
#   2. masks: DETR's mask head alone on that frozen detector (--masks --frozen_weights), reading the scaled
#      attention map (--mask_attention scaled: with DETR's 1 / (heads x cells) scale the head needs many thousands
#      of steps, docs/panoptic.md), evaluated every epoch (box and mask AP, PQ / SQ / RQ in panopticapi's table;
#      the PQ curves, all / things / stuff, in TensorBoard and compare.py);
#   3. a picture of three validation images' panoptic segmentations with predict.py.
# 256-px images: at 128 px the stride-32 map DETR's mask head starts from is 4x4 cells, coarser than the things.
# About 26 minutes on a quiet 2-core machine; ends at PQ 71.7 (things 59.8, stuff 87.5), docs/panoptic.md.
# Output under outputs/demo_panoptic/ (boxes/, masks/, pictures/). Extra flags go to both main.py runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
OUT=outputs/demo_panoptic
MODEL=(--backbone resnet18 --backbone_weights none --backbone_norm batch
       --hidden_dim 128 --nheads 8 --dim_feedforward 256 --enc_layers 2 --dec_layers 2 --num_queries 20
       --dropout 0.0 --dynamic_scale type2 --query_mixture)
RUN=(--synthetic_image_size 256 --batch_size 8 --num_workers 1 --log_every 16 --device cpu)
"$PY" main.py --dataset_file synthetic_panoptic --output_dir "$OUT/boxes" "${MODEL[@]}" "${RUN[@]}" \
  --lr 5e-4 --lr_backbone 5e-4 --epochs 12 --lr_drop 10 --eval_every 4 --resume auto "$@"
# the detector's architecture comes from its checkpoint (--frozen_weights), as with --resume
"$PY" main.py --dataset_file synthetic --masks --mask_attention scaled --frozen_weights "$OUT/boxes/checkpoint.pth" \
  --output_dir "$OUT/masks" "${RUN[@]}" --dropout 0.0 \
  --lr 2e-3 --epochs 4 --lr_drop 3 --eval_every 1 --resume auto "$@"
VAL=$("$PY" -c "import os; from datasets import synthetic as s, synthetic_panoptic as p
print(os.path.join(os.path.expanduser(s.DEFAULT_ROOT), p.dataset_name(42, s.DEFAULT_TRAIN_SIZE, s.DEFAULT_VAL_SIZE, 256),
                   'val2017'))")
"$PY" predict.py --resume "$OUT/masks/checkpoint.pth" --output_dir "$OUT/pictures" --device cpu \
  "$VAL/000001.jpg" "$VAL/000002.jpg" "$VAL/000003.jpg"
# the three panoptic pictures side by side (docs/panoptic_demo.png is this file from the run in docs/panoptic.md)
"$PY" -c "from PIL import Image; import sys
tiles = [Image.open(f'$OUT/pictures/{i:06d}_panoptic.png') for i in (1, 2, 3)]
row = Image.new('RGB', (sum(t.width for t in tiles), max(t.height for t in tiles)), 'white')
for k, t in enumerate(tiles): row.paste(t, (sum(u.width for u in tiles[:k]), 0))
row.save('$OUT/panoptic_demo.png')"
for metric in PQ PQ_th PQ_st; do
  "$PY" experiments/compare.py "$OUT/masks" --metric "$metric" --out "$OUT"
done
echo "demo_panoptic.sh: ${SECONDS} s"
