"""The embeddings plot, drawn with Pillow (matplotlib is not part of the stack).

Queries are blue dots and images orange ones; a few of each, spread over the
plot, are labelled (images with a thumbnail).  Chinese queries are labelled
only when a font with CJK glyphs is installed.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

PLOT_SIZE = (1200, 900)
PLOT_LABELLED_QUERIES = 14
PLOT_LABELLED_IMAGES = 8
QUERY_COLOR = "#4e79a7"
IMAGE_COLOR = "#f28e2b"
CJK = re.compile(r"[\u3000-\u9fff\uac00-\ud7af\uf900-\ufaff]")
CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/noto/NotoSansCJK-Regular.ttc",
)


def cjk_font_path() -> Optional[str]:
    """A font file that has Chinese glyphs, or None (install fonts-wqy-zenhei or fonts-noto-cjk)."""
    for path in CJK_FONT_CANDIDATES:
        if os.path.exists(path):
            return path
    try:
        found = subprocess.run(["fc-match", "-f", "%{file}", ":lang=zh"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if found and found.lower().endswith((".ttf", ".ttc", ".otf")):
        try:
            from PIL import ImageFont

            font = ImageFont.truetype(found, 14)
            if font.getmask("中").getbbox():  # fc-match falls back to any font when none covers zh
                return found
        except OSError:
            pass
    return None


def load_font(size: int, path: Optional[str]):
    """The font at `path` in `size` pixels, or Pillow's default font when path is None."""
    from PIL import ImageFont

    if path:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def spread_picks(points: np.ndarray, count: int, weights: Optional[np.ndarray] = None) -> List[int]:
    """Indices of `count` points far apart (greedy farthest-point), starting from the heaviest."""
    if not len(points) or count <= 0:
        return []
    first = int(np.argmax(weights)) if weights is not None else 0
    picks = [first]
    d = np.linalg.norm(points - points[first], axis=1)
    while len(picks) < min(count, len(points)):
        nxt = int(np.argmax(d))
        if d[nxt] <= 0:
            break
        picks.append(nxt)
        d = np.minimum(d, np.linalg.norm(points - points[nxt], axis=1))
    return picks


def thumbnail_picks(image_points: np.ndarray) -> List[int]:
    """The images draw_embeddings labels (and shows a thumbnail of), so callers read only those files."""
    return spread_picks(image_points, PLOT_LABELLED_IMAGES)


def draw_label(draw, xy: Tuple[int, int], text: str, color: str, font, width: int) -> None:
    """Text at xy on a white box, moved left when it would run off the right edge."""
    x, y = xy
    box = draw.textbbox((x, y), text, font=font)
    if box[2] > width - 4:
        x -= box[2] - (width - 4)
        box = draw.textbbox((x, y), text, font=font)
    draw.rectangle([box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1], fill="white")
    draw.text((x, y), text, fill=color, font=font)


def draw_embeddings(query_points: np.ndarray, queries: Sequence[Tuple[str, int]], image_points: np.ndarray,
                    image_ids: Sequence[str], image_files: Dict[str, bytes], explained: np.ndarray,
                    size: Tuple[int, int] = PLOT_SIZE):
    """(Pillow image, labelled names): the 2-D scatter of `query_points` and `image_points`.

    `queries` are (text, log count) pairs (heavier queries are labelled first),
    `image_files` the bytes of the images to show as thumbnails, `explained`
    the variance ratio of the two axes (for the subtitle).
    """
    from PIL import Image, ImageDraw

    font_path = cjk_font_path()
    width, height = size
    margin, top = 60, 70
    canvas = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(canvas)
    title_font, label_font = load_font(20, font_path), load_font(14, font_path)
    everything = np.vstack([query_points, image_points])
    low, high = everything.min(0), everything.max(0)
    span = np.maximum(high - low, 1e-9)

    def to_pixel(p):
        x = margin + (p[0] - low[0]) / span[0] * (width - 2 * margin)
        y = height - margin - (p[1] - low[1]) / span[1] * (height - top - margin)
        return int(x), int(y)

    draw.rectangle([margin - 10, top - 10, width - margin + 10, height - margin + 10], outline="#cccccc")
    draw.text((margin, 15), f"clicklens: {len(queries)} queries (blue) and {len(image_ids)} images (orange), "
              f"PCA of the joint embedding space", fill="black", font=title_font)
    note = (f"queries and images each centred and scaled on their own; "
            f"PC1 {explained[0]:.0%} / PC2 {explained[1]:.0%} of the variance")
    if font_path is None:
        note += "; no CJK font installed, so only Latin queries are labelled (apt-get install fonts-wqy-zenhei)"
    draw.text((margin, 42), note, fill="#555555", font=label_font)
    for p in image_points:
        x, y = to_pixel(p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=IMAGE_COLOR)
    for p in query_points:
        x, y = to_pixel(p)
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=QUERY_COLOR)

    labelled = []
    for i in thumbnail_picks(image_points):
        x, y = to_pixel(image_points[i])
        data = image_files.get(image_ids[i])
        if data:
            try:
                thumb = Image.open(io.BytesIO(data)).convert("RGB").resize((40, 40), Image.NEAREST)
                canvas.paste(thumb, (x + 6, y - 20))
                draw.rectangle([x + 5, y - 21, x + 46, y + 20], outline=IMAGE_COLOR)
            except OSError:
                pass
        draw_label(draw, (x + 6, y + 22), image_ids[i], "#b85c00", label_font, width)
        labelled.append(image_ids[i])
    latin = np.array([font_path is not None or not CJK.search(q) for q, _ in queries])
    candidates = np.flatnonzero(latin)
    counts = np.array([c for _, c in queries], float)
    for j in spread_picks(query_points[candidates], PLOT_LABELLED_QUERIES, counts[candidates]):
        i = int(candidates[j])
        x, y = to_pixel(query_points[i])
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline="#1f3b63", width=2)
        draw_label(draw, (x + 8, y - 8), queries[i][0], "#1f3b63", label_font, width)
        labelled.append(queries[i][0])
    return canvas, labelled
