"""The plot of a position-bias fit: propensity by position, as a PNG next to report.json.

Drawn with PIL (no plotting library is a dependency): one line per segment of
fitted propensities relative to position 1, and, dashed grey, the raw CTR by
position relative to position 1's, which is what a position-blind learner
sees: the gap between them is the ranker's doing, not the users' eyes.
"""


import io
from typing import Any, Dict, List, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 720, 440
LEFT, RIGHT, TOP, BOTTOM = 60, 150, 40, 50
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _series(by_position: Dict[str, Any]) -> Dict[str, List[Tuple[int, float]]]:
    """{"1": v} -> {"": [(1, v)]}; {segment: {"1": v}} -> {segment: [(1, v)]}."""
    if by_position and isinstance(next(iter(by_position.values())), dict):
        return {segment: sorted((int(p), v) for p, v in values.items()) for segment, values in by_position.items()}
    return {"": sorted((int(p), v) for p, v in by_position.items())}


def propensity_png(fit: Dict[str, Any]) -> bytes:
    """PNG bytes of the fit's propensities (and relative raw CTR) by position."""
    fitted = _series(fit["propensities"])
    ctr = _series(fit.get("ctr_by_position", {}))
    positions = [p for points in list(fitted.values()) + list(ctr.values()) for p, _ in points] or [1]
    max_position = max(positions)
    image = Image.new("RGB", (WIDTH, HEIGHT), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(position: float, value: float) -> Tuple[float, float]:
        x = LEFT + (position - 1) / max(max_position - 1, 1) * plot_w
        return x, TOP + (1.0 - min(max(value, 0.0), 1.05) / 1.05) * plot_h

    draw.rectangle([LEFT, TOP, LEFT + plot_w, TOP + plot_h], outline="black")
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        _, y = xy(1, tick)
        draw.line([LEFT - 4, y, LEFT + plot_w, y], fill=(225, 225, 225))
        draw.text((LEFT - 36, y - 6), f"{tick:.2f}", fill="black", font=font)
    step = max(1, max_position // 10)
    for position in range(1, max_position + 1, step):
        x, _ = xy(position, 0)
        draw.line([x, TOP + plot_h, x, TOP + plot_h + 4], fill="black")
        draw.text((x - 4, TOP + plot_h + 8), str(position), fill="black", font=font)
    draw.text((LEFT + plot_w // 2 - 20, HEIGHT - 20), "position", fill="black", font=font)
    draw.text((LEFT, 12), "examination propensity (relative to position 1), PBM fitted by EM", fill="black",
              font=font)

    legend_y = TOP
    for segment, points in sorted(ctr.items()):
        first = dict(points).get(1) or (points[0][1] if points else 0)
        if not first:
            continue
        line = [xy(p, v / first) for p, v in points]
        for a, b in zip(line[::2], line[1::2]):
            draw.line([a, b], fill=(150, 150, 150), width=2)
    draw.line([LEFT + plot_w + 10, legend_y + 6, LEFT + plot_w + 30, legend_y + 6], fill=(150, 150, 150), width=2)
    draw.text((LEFT + plot_w + 34, legend_y), "raw CTR / CTR@1", fill="black", font=font)
    legend_y += 16
    for k, (segment, points) in enumerate(sorted(fitted.items())):
        colour = COLOURS[k % len(COLOURS)]
        line = [xy(p, v) for p, v in points]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([LEFT + plot_w + 10, legend_y + 6, LEFT + plot_w + 30, legend_y + 6], fill=colour, width=2)
        draw.text((LEFT + plot_w + 34, legend_y), f"pbm {segment or 'all'}"[:16], fill="black", font=font)
        legend_y += 16
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_bytes(path: str, data: bytes) -> str:
    """Writes `data` to `path` (any Beam file system); returns the path."""
    with FileSystems.create(path) as f:
        f.write(data)
    return path


class WritePropensityPlot(beam.PTransform):
    """The fit (one dict) -> the PNG at `path`; outputs the path."""

    def __init__(self, path: str):
        super().__init__()
        self._path = path

    def expand(self, fit):
        path = self._path
        return fit | "Plot" >> beam.Map(lambda f: write_bytes(path, propensity_png(f)))
