"""Preview tiles of `cp monitor` (part of the view, free of I/O): half-block thumbnails, audio meters with
peak hold and a clip mark, a table's latest row, an event port's last values; packed into a panel.

A thumbnail cell is `▀` with the upper pixel as its foreground colour and the lower one as its
background: two pixels per character, roughly square. Colours are given as 24-bit RGB; rich turns
them into the 256 or 16 colours of a terminal that has no true colour. Without colour at all,
a brightness ramp of ASCII characters stands in.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
from rich.color import Color, ColorType
from rich.color_triplet import ColorTriplet
from rich.segment import Segment
from rich.style import Style

from cpcli.monitor.state import EventsPreview, FramePreview, LevelPreview, PortPreview, ValuesPreview

Line = list[Segment]
SMALL_WIDTH = 22  # a tile's width in cells: three fit 80 columns, six fit 160
SMALL_ROWS = 6  # a small thumbnail's height in rows (12 pixels)
ROOMY_SIZES = ((42, 12), (32, 9))  # larger tiles (width, thumbnail rows) when every preview still fits
BIG_WIDTH = 64  # the selected node's thumbnail: the preview's own size (64 x 36 pixels at most)
BIG_ROWS = 18
MIN_ROWS = 3  # a title and two rows, or no previews at all
METER_FLOOR_DB = -60.0  # the left end of an audio meter
METER_WARN_DB, METER_HOT_DB = -12.0, -3.0  # meter colours: green below, yellow, red above
RAMP = " .:-=+*#%@"  # brightness, for a terminal without colour
_TITLE = Style(bold=True)
_BLANK = Style()


def _pad(line: Line, width: int) -> Line:
    return Segment.adjust_line_length(line, width, _BLANK)


def thumbnail(rgb: np.ndarray, width: int, rows: int, color: bool = True) -> list[Line]:
    """An H x W x 3 frame scaled (nearest pixel) into `width` cells by at most `rows` rows of half blocks."""
    height_px, width_px = rgb.shape[:2]
    scale = min(width / width_px, 2 * rows / height_px)
    out_w = max(1, int(width_px * scale))
    out_h = max(2, int(height_px * scale) // 2 * 2)
    ys = np.arange(out_h) * height_px // out_h
    xs = np.arange(out_w) * width_px // out_w
    pixels = rgb[ys][:, xs]
    lines: list[Line] = []
    if not color:
        light = pixels.astype(np.uint16).sum(axis=2)  # 0 .. 765
        pairs = (light[0::2] + light[1::2]) * (len(RAMP) - 1) // (2 * 765)
        return [_pad([Segment("".join(RAMP[v] for v in row))], width) for row in pairs.tolist()]
    packed = (pixels[..., 0].astype(np.int64) << 16 | pixels[..., 1].astype(np.int64) << 8 | pixels[..., 2]).tolist()
    colors: dict[int, Color] = {}

    def rgb_color(value: int) -> Color:
        found = colors.get(value)
        if found is None:  # built directly: Color.from_rgb would cost five times as much per pixel
            found = colors[value] = Color(f"#{value:06x}", ColorType.TRUECOLOR,
                                          triplet=ColorTriplet(value >> 16, value >> 8 & 255, value & 255))
        return found

    for y in range(0, out_h, 2):
        line = [Segment("▀", Style.from_color(rgb_color(top), rgb_color(bottom)))
                for top, bottom in zip(packed[y], packed[y + 1], strict=True)]
        lines.append(_pad(line, width))
    return lines


def _meter_style(db: float) -> str:
    return "red" if db >= METER_HOT_DB else "yellow" if db >= METER_WARN_DB else "green"


def meter(level: LevelPreview, width: int, rows: int) -> list[Line]:
    """One bar per channel from METER_FLOOR_DB to 0 dBFS: the RMS level filled, the held peak as `|`."""
    lines: list[Line] = []
    channels = list(zip(level.rms_db, level.peak_db or level.rms_db, strict=False))
    shown = channels if len(channels) <= rows else channels[:max(1, rows - 1)]
    bar = max(4, width - 7)
    for rms, peak in shown:
        filled = min(bar, max(0, round((rms - METER_FLOOR_DB) / -METER_FLOOR_DB * bar)))
        held = min(bar - 1, round((peak - METER_FLOOR_DB) / -METER_FLOOR_DB * bar) - 1) if peak > METER_FLOOR_DB \
            else -1
        segments = []
        for i in range(bar):
            db = METER_FLOOR_DB * (1 - (i + 1) / bar)
            if i == held:
                segments.append(Segment("|", Style.parse("bold " + _meter_style(db))))
            elif i < filled:
                segments.append(Segment("█", Style.parse(_meter_style(db))))
            else:
                segments.append(Segment("·", Style(dim=True)))
        segments.append(Segment(f"{max(rms, -99.9):6.1f}" if not math.isinf(rms) else "  -inf"))
        lines.append(_pad(segments, width))
    if len(shown) < len(channels):
        lines.append(_pad([Segment(f"+{len(channels) - len(shown)} channels", Style(dim=True))], width))
    return lines


def _short(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, separators=(",", ":"))


def values(preview: ValuesPreview, width: int, rows: int) -> list[Line]:
    key_w = min(max((len(k) for k, _ in preview.values), default=0), width // 2)
    return [_pad([Segment(f"{k[:key_w]:<{key_w}} ", Style(dim=True)), Segment(_short(v))], width)
            for k, v in preview.values[:rows]]


def events(preview: EventsPreview, width: int, rows: int) -> list[Line]:
    return [_pad([Segment(_short(v))], width) for v in preview.values[-rows:]]


def _frame_scale(content: FramePreview, width: int, rows: int) -> float:
    h, w = (int(n) for n in content.rgb.shape[:2])
    return min(width / w, 2 * rows / h)


def natural_rows(preview: PortPreview, width: int, big: bool, frame_rows: int = SMALL_ROWS) -> int:
    """Rows of content a preview would like at this width."""
    content = preview.content
    if isinstance(content, FramePreview):
        most = BIG_ROWS if big else frame_rows
        return max(1, min(most, math.ceil(int(content.rgb.shape[0]) * _frame_scale(content, width, most) / 2)))
    if isinstance(content, LevelPreview):
        return max(1, len(content.rms_db))
    if isinstance(content, ValuesPreview):
        return max(1, min(len(content.values), 8 if big else 4))
    return max(1, min(len(content.values), 6 if big else 4))


def natural_width(preview: PortPreview, most: int) -> int:
    """Cells the selected node's tile would like: a thumbnail as large as the preview allows, others `most`."""
    content = preview.content
    if isinstance(content, FramePreview):
        return max(len(preview.node) + len(preview.port) + 1,
                   int(int(content.rgb.shape[1]) * _frame_scale(content, most, BIG_ROWS)))
    return min(most, 2 * SMALL_WIDTH)


def tile(preview: PortPreview, width: int, rows: int, color: bool, selected: bool = False,
         frame_rows: int = SMALL_ROWS) -> list[Line]:
    """A titled tile of exactly `width` cells and at most `rows` lines (title included)."""
    content = preview.content
    title = [Segment(f"{preview.node}/{preview.port}", Style(bold=True, reverse=selected))]
    if isinstance(content, LevelPreview) and content.clipped:
        title.append(Segment(" CLIP", Style(bold=True, color="white", bgcolor="red")))
    if preview.stale:
        title.append(Segment(f" stale {preview.age_s:.0f}s", Style(dim=True)))
    body_rows = max(0, min(rows - 1, natural_rows(preview, width, selected, frame_rows)))
    if isinstance(content, FramePreview):
        body = thumbnail(content.rgb, width, body_rows, color) if body_rows else []
    elif isinstance(content, LevelPreview):
        body = meter(content, width, body_rows)
    elif isinstance(content, ValuesPreview):
        body = values(content, width, body_rows)
    else:
        body = events(content, width, body_rows)
    return [_pad(title, width), *body[:body_rows]]


def _side_by_side(blocks: Sequence[list[Line]], widths: Sequence[int], total: int) -> list[Line]:
    height = max((len(b) for b in blocks), default=0)
    lines = []
    for i in range(height):
        line: Line = []
        for n, (block, w) in enumerate(zip(blocks, widths, strict=True)):
            if n:
                line.append(Segment(" "))
            line.extend(block[i] if i < len(block) else [Segment(" " * w)])
        lines.append(_pad(line, total))
    return lines


def pack(previews: Sequence[PortPreview], width: int, height: int, color: bool, tile_width: int = SMALL_WIDTH,
         frame_rows: int = SMALL_ROWS) -> tuple[list[Line], int]:
    """Tiles in rows, as many as fit `width` x `height`; returns the lines and how many were placed."""
    per_row = max(1, (width + 1) // (tile_width + 1))
    tile_w = min(tile_width, width)
    lines: list[Line] = []
    placed = 0
    while placed < len(previews):
        row = previews[placed:placed + per_row]
        left = height - len(lines)
        want = 1 + max(natural_rows(p, tile_w, False, frame_rows) for p in row)
        if left < min(want, MIN_ROWS):
            break
        blocks = [tile(p, tile_w, min(want, left), color, frame_rows=frame_rows) for p in row]
        lines.extend(_side_by_side(blocks, [tile_w] * len(blocks), width))
        placed += len(row)
    return lines, placed


def panel(previews: Sequence[PortPreview], order: Sequence[str], selected: str | None, width: int, height: int,
          color: bool = True) -> list[Line]:
    """Every preview that fits: the selected node's large on the left, the others small around it."""
    rank = {node: i for i, node in enumerate(order)}
    ordered = sorted(previews, key=lambda p: (rank.get(p.node, len(rank)), p.node, p.port))
    big = next((p for p in ordered if p.node == selected), None)
    rest = [p for p in ordered if p is not big]
    lines: list[Line] = []
    placed = 0
    if big is None:
        for tile_width, frame_rows in ROOMY_SIZES:
            roomy, placed = pack(ordered, width, height, color, tile_width, frame_rows)
            if placed == len(ordered):
                return roomy
    else:
        big_w = min(natural_width(big, BIG_WIDTH), width)
        big_lines = tile(big, big_w, min(height, 1 + natural_rows(big, big_w, True)), color, selected=True)
        right_w = width - big_w - 1
        if right_w >= SMALL_WIDTH:
            right, placed = pack(rest, right_w, len(big_lines), color)
            lines = _side_by_side([big_lines, right], [big_w, right_w], width)
        else:
            lines = [_pad(line, width) for line in big_lines]
    below, more = pack(rest[placed:], width, height - len(lines), color)
    lines += below
    hidden = len(rest) - placed - more
    if hidden > 0 and lines:
        note = _pad([Segment(f"+{hidden} previews: a larger terminal shows them, ←→ selects one", Style(dim=True))],
                    width)
        lines = [*lines, note] if len(lines) < height else [*lines[:-1], note]
    return lines[:height]
