"""Pictures of detections: boxes drawn on the image (Pillow), and the attention figure (matplotlib) of the last
decoder layer's co-attention per head with, for SMCA, the spatial prior of each head (DETR's attention notebook
picture, extended with the prior). ``query_panels`` computes the arrays a figure shows, ``plot_attention`` only
draws them."""
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager, patheffects  # noqa: E402
from PIL import Image, ImageDraw, ImageFilter, ImageFont  # noqa: E402

from models.attention_maps import CoAttentionMaps  # noqa: E402

# Okabe-Ito's colour-blind-safe qualitative palette (plus two), one colour per category id modulo its length
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167), (255, 255, 255), (170, 68, 153), (120, 220, 120))


def class_colour(category_id: int) -> Tuple[int, int, int]:
    return PALETTE[int(category_id) % len(PALETTE)]


def _text_colour(rgb) -> Tuple[int, int, int]:
    """Black on light colours, white on dark ones (relative luminance)."""
    return (0, 0, 0) if 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 140 else (255, 255, 255)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    # matplotlib ships DejaVu Sans, so every machine that can run the figures has this font
    return ImageFont.truetype(font_manager.findfont("DejaVu Sans:bold"), size)


def draw_detections(image: Image.Image, boxes: np.ndarray, category_ids: Sequence[int], names: Sequence[str],
                    scores: Sequence[float], scale: float = 1.0) -> Image.Image:
    """The image (resized by ``scale``) with one box per detection, labelled '<name> <score>' on a tag of the
    box's colour (one colour per category). boxes: (K, 4) absolute xyxy in ``image``'s pixels."""
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # nearest: an enlarged small image shows its actual pixels (and its PNG stays small)
    canvas = image.convert("RGB").resize(size, Image.NEAREST) if scale != 1 else image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(min(size) / 200))
    font = _font(max(10, round(min(size) / 28)))
    scaled = np.asarray(boxes, dtype=float).reshape(-1, 4) * scale
    texts = [f"{name} {score:.2f}" for name, score in zip(names, scores)]
    text_boxes = [draw.textbbox((0, 0), text, font=font) for text in texts]  # (left, top, right, bottom)
    sizes = [(right - left + 2 * line, bottom - top + 2 * line) for left, top, right, bottom in text_boxes]
    tags = layout_tags(scaled, sizes, scores, size)
    order = np.argsort(np.asarray(scores, dtype=float), kind="stable")  # best last, so it is drawn on top
    for k in order:
        draw.rectangle(list(scaled[k]), outline=class_colour(category_ids[k]), width=line)
    for k in order:
        colour = class_colour(category_ids[k])
        x, y, w, h = tags[k]
        draw.rectangle([x, y, x + w, y + h], fill=colour)
        draw.text((x + line - text_boxes[k][0], y + line - text_boxes[k][1]), texts[k], fill=_text_colour(colour),
                  font=font)
    return canvas


def draw_panoptic(image: Image.Image, segments: np.ndarray, infos: Sequence[dict], names: Sequence[str],
                  scale: float = 1.0, opacity: float = 0.55) -> Image.Image:
    """The image (resized by ``scale``) with each panoptic segment tinted in its own colour, outlined, and named at
    its pixel nearest the segment's centroid; VOID pixels (0) keep the image as it is. segments: (H, W) ints at
    the image's size, k = the k-th entry of ``infos`` (PostProcessPanoptic's 'segments' / 'segments_info')."""
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    ids = np.asarray(Image.fromarray(np.asarray(segments, dtype=np.int32)).resize(size, Image.NEAREST))
    base = np.asarray(image.convert("RGB").resize(size, Image.NEAREST), dtype=np.float32)
    colours = np.array([(0, 0, 0)] + [class_colour(k) for k in range(1, len(infos) + 1)], dtype=np.float32)
    alpha = np.where(ids > 0, opacity, 0.0)[..., None]  # (H, W, 1)
    tinted = (1 - alpha) * base + alpha * colours[ids]
    edges = np.zeros(ids.shape, dtype=bool)  # pixels whose right or lower neighbour is another segment
    edges[:, :-1] |= ids[:, 1:] != ids[:, :-1]
    edges[:-1] |= ids[1:] != ids[:-1]
    tinted[edges] = 255
    canvas = Image.fromarray(tinted.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font(max(10, round(min(size) / 28)))
    for k, name in enumerate(names, start=1):
        ys, xs = np.nonzero(ids == k)
        if len(xs) == 0:
            continue
        nearest = np.argmin((xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2)
        colour = tuple(int(c) for c in colours[k])
        draw.text((int(xs[nearest]), int(ys[nearest])), name, fill=_text_colour(colour), font=font, anchor="mm",
                  stroke_width=max(1, round(min(size) / 200)), stroke_fill=colour)
    return canvas


def layout_tags(boxes: np.ndarray, sizes: Sequence[Tuple[float, float]], scores: Sequence[float],
                canvas: Tuple[int, int]) -> List[Tuple[float, float, float, float]]:
    """(x, y, w, h) of each box's label tag of size ``sizes[k]`` inside the canvas (width, height): above the box,
    else inside its top, below it, inside its bottom, the first place free of tags already placed; the best
    scores are placed first. boxes: (K, 4) xyxy in canvas pixels."""
    tags: List = [None] * len(sizes)
    placed = []
    for k in np.argsort(-np.asarray(scores, dtype=float), kind="stable"):
        x0, y0, x1, y1 = boxes[k]
        w, h = sizes[k]
        x = min(max(0.0, x0), max(0.0, canvas[0] - w))
        spots = [y for y in (y0 - h, y0, y1, y1 - h) if 0 <= y <= canvas[1] - h] or [max(0.0, min(y0, canvas[1] - h))]
        free = [y for y in spots if not any(_overlap((x, y, x + w, y + h), r) for r in placed)]
        y = (free or spots)[0]
        placed.append((x, y, x + w, y + h))
        tags[k] = (x, y, w, h)
    return tags


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@dataclass
class QueryPanels:
    """The arrays of one query's rows in the attention figure, placed in the original image's pixels."""
    attention: np.ndarray  # (nhead, H, W) co-attention probabilities over the feature cells
    prior: Optional[np.ndarray]  # (nhead, H, W) log-prior G of each head (SpatialPrior's output); None for DETR
    centres: Optional[np.ndarray]  # (nhead, 2) head centres (x, y) in image pixels; None for DETR
    has_prior: Optional[np.ndarray]  # (nhead,) bool: the mixtures leave some heads/queries without a prior
    extent: Tuple[float, float, float, float]  # (left, right, bottom, top) of the feature grid in image pixels


def query_panels(maps: CoAttentionMaps, index: int, query: int, input_size: Tuple[int, int],
                 image_size: Tuple[int, int]) -> QueryPanels:
    """The maps of query ``query`` of batch item ``index``; input_size / image_size: (h, w) of the model input
    and of the original image. Feature cell (i, j) covers input pixels [j s, (j + 1) s) x [i s, (i + 1) s)."""
    height, width = maps.attention.shape[-2:]
    ratio_x = image_size[1] / input_size[1]
    ratio_y = image_size[0] / input_size[0]
    extent = (0.0, width * maps.stride * ratio_x, height * maps.stride * ratio_y, 0.0)
    panels = QueryPanels(attention=maps.attention[index, :, query].cpu().numpy(), prior=None, centres=None,
                         has_prior=None, extent=extent)
    if maps.prior is not None:
        panels.prior = maps.prior[index, :, query].cpu().numpy()
        # G peaks at cell coordinate c, and cell c is drawn centred on pixel (c + 0.5) s
        centres = (maps.centres[index, :, query].cpu().numpy() + 0.5) * maps.stride  # (nhead, 2) input pixels
        panels.centres = centres * np.array([ratio_x, ratio_y])
        panels.has_prior = maps.prior_mask[query].cpu().numpy() > 0
    return panels


@dataclass
class AttentionRow:
    """One detection of the attention figure."""
    panels: QueryPanels
    box: np.ndarray  # (4,) xyxy in image pixels
    title: str
    colour: Tuple[int, int, int]


def _rgb(colour) -> Tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def _backdrop(image: Image.Image) -> np.ndarray:
    """The grey copy shown under heat maps, so their colours read: luminance, compressed to [0.15, 0.9], and
    smoothed a little (the panels are thumbnails; pixel noise would only cost file size)."""
    grey = image.convert("L").filter(ImageFilter.GaussianBlur(radius=max(1.0, min(image.size) / 200)))
    return 0.15 + 0.75 * np.asarray(grey, dtype=np.float32) / 255


def _show_image(ax, shown: np.ndarray, box: np.ndarray, colour) -> None:
    """An RGB image, or a (H, W) backdrop in grey, with the detection's box."""
    height, width = shown.shape[:2]
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, extent=(0, width, height, 0), interpolation="bilinear")
    ax.add_patch(plt.Rectangle((box[0], box[1]), box[2] - box[0], box[3] - box[1], fill=False,
                               edgecolor=_rgb(colour), linewidth=1.5))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax, values: np.ndarray, cmap: str, extent) -> None:
    """values (H, W) in [0, 1] as colour over the image, more opaque where larger: low cells leave the image
    visible. Cells are drawn as blocks (nearest), the resolution the model works at."""
    rgba = plt.get_cmap(cmap)(values)  # (H, W, 4)
    rgba[..., 3] = 0.15 + 0.75 * values
    ax.imshow(rgba, extent=extent, interpolation="nearest")


def _mark(ax, xy, label: Optional[str] = None) -> None:
    ax.plot(*xy, marker="+", markersize=9, markeredgewidth=2.2, color="black")
    ax.plot(*xy, marker="+", markersize=8, markeredgewidth=1.2, color="white")
    if label is not None:
        ax.annotate(label, xy, xytext=(2, 2), textcoords="offset points", fontsize=6, color="white",
                    fontweight="bold", path_effects=[patheffects.withStroke(linewidth=2, foreground="black")])


def plot_attention(image: Image.Image, rows: List[AttentionRow], path, dpi: int = 80,
                   panel_inches: float = 1.45) -> None:
    """One block per detection: a row of its co-attention per head (each map scaled to its own maximum, the
    head's largest weight in the title) and, where the query has a prior (SMCA), a row of each head's prior
    exp(G) on a fixed [0, 1] scale; '+' marks each head's centre. The first column shows the image with the
    detection's box (and, in the prior row, all head centres, numbered)."""
    pixels = np.asarray(image.convert("RGB"))
    backdrop = _backdrop(image)
    height, width = pixels.shape[:2]
    nhead = rows[0].panels.attention.shape[0]
    kinds = [("attention", "prior") if _uses_prior(row.panels) else ("attention",) for row in rows]
    blocks_inches = [len(k) * panel_inches * height / width + 0.45 for k in kinds]
    fig = plt.figure(figsize=((nhead + 1) * panel_inches, sum(blocks_inches) + 0.3), layout="constrained", dpi=dpi)
    smca = rows[0].panels.prior is not None
    fig.suptitle("last decoder layer, per head: co-attention, each map scaled to its maximum"
                 + ("\nspatial prior exp(G) on [0, 1];  + = head centre" if smca else ""), fontsize=9)
    blocks = fig.subfigures(len(rows), 1, squeeze=False, height_ratios=blocks_inches)[:, 0]
    for block, row, row_kinds in zip(blocks, rows, kinds):
        no_prior = smca and len(row_kinds) == 1
        block.suptitle(row.title + (" (a plain query: no prior)" if no_prior else ""), fontsize=9,
                       fontweight="bold", color=_rgb(_darker(row.colour)))
        axes = block.subplots(len(row_kinds), nhead + 1, squeeze=False)
        for axes_row, kind in zip(axes, row_kinds):
            _draw_row(axes_row, kind, row, pixels, backdrop)
    fig.canvas.draw()
    rgb = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])
    plt.close(fig)
    # 256 colours hold the heat maps and the faded images; the file is several times smaller than full RGB
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def _uses_prior(panels: QueryPanels) -> bool:
    """SMCA and some head of this query has a prior (--query_mixture leaves half the queries without)."""
    return panels.prior is not None and bool(panels.has_prior.any())


def _darker(colour) -> Tuple[int, int, int]:
    """Title text in the box's colour, darkened where the colour is too light to read on white."""
    light = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
    factor = min(1.0, 150 / max(light, 1))
    return tuple(round(c * factor) for c in colour)


def _draw_row(axes_row, kind: str, row: AttentionRow, pixels: np.ndarray, backdrop: np.ndarray) -> None:
    p = row.panels
    _show_image(axes_row[0], pixels, row.box, row.colour)
    axes_row[0].set_ylabel("co-attention" if kind == "attention" else "prior exp(G)", fontsize=8)
    for m, ax in enumerate(axes_row[1:]):
        _show_image(ax, backdrop, row.box, row.colour)
        if kind == "attention":
            peak = float(p.attention[m].max())
            _overlay(ax, p.attention[m] / max(peak, 1e-12), "inferno", p.extent)
            ax.set_title(f"head {m}  max {peak:.2f}", fontsize=7)
        elif p.has_prior[m]:
            _overlay(ax, np.exp(p.prior[m]), "viridis", p.extent)
            ax.set_title(f"head {m}", fontsize=7)
        else:
            ax.set_title(f"head {m}: no prior", fontsize=7)
        if p.prior is not None and p.has_prior[m]:
            _mark(ax, p.centres[m])
            if kind == "prior":
                _mark(axes_row[0], p.centres[m], str(m))
