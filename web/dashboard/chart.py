"""The overview's per-minute chart as inline SVG: no JavaScript, no CDN, renders anywhere."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


@dataclass(frozen=True)
class Bar:
    x: float
    width: float
    total_y: float
    total_h: float
    failed_y: float
    failed_h: float
    label: str
    total: int
    failed: int


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    peak: int
    ticks: list[tuple[float, str]]  # x, HH:MM labels every 10 minutes


def per_minute_chart(
    series: list[tuple[int, int, int]], *, width: int = 720, height: int = 140, bucket_s: int = 60
) -> Chart:
    """`series` is (epoch bucket, finished, failed), oldest first; a bucket is a minute, or
    `bucket_s` seconds (an hour for the long-range charts)."""
    peak = max((total for _, total, _ in series), default=0)
    scale = (height - 20) / peak if peak else 0.0
    slot = width / max(len(series), 1)
    bars = []
    ticks = []
    for i, (minute, total, failed) in enumerate(series):
        at = datetime.fromtimestamp(minute * bucket_s, UTC)
        total_h = total * scale
        failed_h = failed * scale
        bars.append(
            Bar(
                x=round(i * slot + 1, 1),
                width=round(max(slot - 2, 1), 1),
                total_y=round(height - 14 - total_h, 1),
                total_h=round(total_h, 1),
                failed_y=round(height - 14 - failed_h, 1),
                failed_h=round(failed_h, 1),
                label=f"{at:%H:%M}" if bucket_s < 3600 else f"{at:%m-%d %H:00}",
                total=total,
                failed=failed,
            )
        )
        if bucket_s < 3600 and at.minute % 10 == 0:
            ticks.append((round(i * slot, 1), f"{at:%H:%M}"))
        elif bucket_s >= 3600 and at.hour == 0 and (len(series) <= 48 or at.day % 5 == 0):
            ticks.append((round(i * slot, 1), f"{at:%m-%d}"))
    return Chart(width, height, bars, peak, ticks)
