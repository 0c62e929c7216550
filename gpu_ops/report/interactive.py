"""The report's interactive map: Plotly WebGL scatter traces plus a small script (``map.js``).

The page gets one JSON document (:func:`map_document`) holding, per colour mode, the traces
Plotly draws (one ``Scattergl`` trace per cluster or class, coordinates as base64 typed arrays;
``customdata`` holds each point's row in ``ids``), the shared layout, the image ids and the
thumbnails (data URIs) of a bounded sample of points. ``map.js`` draws it with plotly.js, which
the page either inlines or loads from ``figures/plotly.min.js`` beside it: nothing is fetched
from the network. What the points are and how they group comes from
:func:`gpu_ops.report.data.map_points`.
"""

from __future__ import annotations

import base64
import io
import json
from importlib import resources
from typing import Any

import numpy as np

from gpu_ops.report.data import ColourMode, MapPoints

#: plotly.js, written beside the page (``figures/PLOTLY_JS``) unless the page inlines it.
PLOTLY_JS = "plotly.min.js"
#: The script that turns the map document into the interactive map (package data).
SCRIPT = "map.js"
#: Colour of points outside every group (noise, no label) and of points without a score.
NONE_COLOUR = "#bdbdbd"
#: A clicked cluster lists at most this many members on the page (the count is always exact).
MEMBER_LIST_CAP = 5000


def plotly_js() -> str:
    """The plotly.js bundle that ships with the installed plotly package (no network)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def map_script() -> str:
    """``map.js``: draws the map document, the hover tooltip, the member list and the mode switch."""
    return resources.files("gpu_ops.report").joinpath(SCRIPT).read_text(encoding="utf-8")


def marker_size(n: int) -> float:
    """Marker diameter in px: 8 up to ~2,500 points, 4 at 10,000, 2 from 40,000 on."""
    return float(np.clip(400.0 / np.sqrt(max(n, 1)), 2.0, 8.0))


def _hex(rgba: tuple[float, ...]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgba[:3])


def group_colours(groups: list[int]) -> dict[int, str]:
    """Hex colour per group id: the static figures' palette (tab10 / tab20) for ids >= 0, grey for -1."""
    from gpu_ops.report.figures import label_colors

    real = [g for g in groups if g >= 0]
    colours = {g: _hex(c) for g, c in label_colors(real).items()}
    return {g: colours.get(g, NONE_COLOUR) for g in groups}


def mode_traces(points: MapPoints, mode: ColourMode, *, webgl: bool = True) -> list[dict[str, Any]]:
    """The Plotly traces of one colour mode, as plain JSON-ready dicts (typed arrays in base64).

    Groupings: one trace per group, largest first, named by the group, its member rows in
    ``customdata`` (so a legend entry's trace lists exactly that group's members). Scores: one
    trace with a continuous colour scale, plus a grey one for points without a score.
    ``webgl=False`` draws SVG ``Scatter`` traces instead (for comparison; slow beyond ~10,000 points).
    """
    import plotly.graph_objects as go

    kind = go.Scattergl if webgl else go.Scatter
    size = marker_size(len(points.ids))
    xy = points.xy
    traces = []
    if mode.grouping:
        groups, counts = np.unique(mode.values, return_counts=True)
        order = sorted(range(len(groups)), key=lambda i: (groups[i] < 0, -counts[i], groups[i]))
        colours = group_colours([int(g) for g in groups])
        for i in order:
            g = int(groups[i])
            rows = np.flatnonzero(mode.values == g).astype(np.int32)
            traces.append(kind(x=xy[rows, 0], y=xy[rows, 1], customdata=rows, mode="markers", hoverinfo="none",
                               name=f"{mode.names.get(g, str(g))} ({len(rows)})", meta={"group": g},
                               marker={"color": colours[g], "size": size, "line": {"width": 0}}))
    else:
        has = np.isfinite(mode.values)
        rows = np.flatnonzero(has).astype(np.int32)
        traces.append(kind(x=xy[rows, 0], y=xy[rows, 1], customdata=rows, mode="markers", hoverinfo="none",
                           name=mode.title, showlegend=False,
                           marker={"color": mode.values[rows].astype(np.float32), "colorscale": "Viridis",
                                   "showscale": True, "size": size, "line": {"width": 0},
                                   "colorbar": {"title": {"text": mode.title}}}))
        if not has.all():
            none = np.flatnonzero(~has).astype(np.int32)
            traces.append(kind(x=xy[none, 0], y=xy[none, 1], customdata=none, mode="markers", hoverinfo="none",
                               name=f"no score ({len(none)})",
                               marker={"color": NONE_COLOUR, "size": size, "line": {"width": 0}}))
    # go.Figure.to_dict turns numpy arrays into plotly.js typed-array specs ({"dtype", "bdata"})
    return go.Figure(data=traces).to_dict()["data"]


def map_layout(title: str) -> dict[str, Any]:
    """The layout every mode shares: pan by default, axes hidden, equal scales, zoom kept across modes."""
    axis = {"showgrid": False, "zeroline": False, "showticklabels": False, "title": {"text": ""}}
    return {"title": {"text": title, "font": {"size": 14}}, "dragmode": "pan", "hovermode": "closest",
            "uirevision": "map", "xaxis": axis, "yaxis": {**axis, "scaleanchor": "x"},
            "legend": {"itemsizing": "constant", "font": {"size": 11}}, "margin": {"l": 10, "r": 10, "t": 40, "b": 10},
            "plot_bgcolor": "#ffffff", "paper_bgcolor": "#ffffff", "height": 640}


def thumbnail_uri(tile: np.ndarray) -> str:
    """A data URI for an (s, s, 3) uint8 tile: PNG for grey images (exact and small), JPEG for colour."""
    from PIL import Image

    tile = np.asarray(tile, dtype=np.uint8)
    grey = bool((tile[..., 0] == tile[..., 1]).all() and (tile[..., 1] == tile[..., 2]).all())
    buf = io.BytesIO()
    if grey:
        Image.fromarray(tile[..., 0]).save(buf, format="PNG", optimize=True)
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    Image.fromarray(tile).save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def map_document(points: MapPoints, thumbnails: dict[int, str], title: str, *, webgl: bool = True,
                 thumb_note: str = "") -> dict[str, Any]:
    """Everything ``map.js`` needs: ids, modes (key, title, traces), layout, thumbnails by row."""
    return {
        "ids": points.ids,
        "modes": [{"key": m.key, "title": m.title, "grouping": m.grouping,
                   "traces": mode_traces(points, m, webgl=webgl)} for m in points.modes],
        "layout": map_layout(title),
        "thumbnails": {str(i): uri for i, uri in thumbnails.items()},
        "thumb_note": thumb_note,
        "member_cap": MEMBER_LIST_CAP,
        "webgl": webgl,
    }


def document_json(doc: dict[str, Any]) -> str:
    """The map document as JSON that is safe inside ``<script type="application/json">``."""
    text = json.dumps(doc, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
