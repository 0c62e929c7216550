"""The run report: PNG figures and a self-contained HTML page for one run directory.

:func:`build_report` reads a run directory and writes

* ``RUN_DIR/figures/*.png`` — usable without the page:
  ``map-<algorithm>.png`` (2-D map coloured by cluster), ``map-label.png`` (by true label, when
  labels exist), ``thumbnails.png`` (a few hundred images drawn at their map coordinates),
  ``montage-<algorithm>-c<cluster>.png`` (a grid of member images per cluster),
  ``confusion-<algorithm>.png`` (after Hungarian mapping), ``dendrogram-<algorithm>.png``,
  ``k-selection.png`` (elbow, silhouette and modularity), ``tsne-sweep.png`` (t-SNE maps at several
  perplexities), ``reconstructions.png``, ``timings.png``, and when the run has
  ``duplicates.parquet`` / ``outliers.parquet``: ``duplicates-NNN.png`` (a pair side by side),
  ``outliers.png`` (the most unusual images) and ``flag-<flag>.png`` (images a quality flag marks);
* ``RUN_DIR/map.png`` — a copy of the first algorithm's ``map-<algorithm>.png``;
* ``RUN_DIR/report.html`` — one page from the ``report.html.j2`` template (autoescaped), HTML +
  inline CSS, no network; images are linked as ``figures/NAME.png`` beside it (or embedded as data
  URIs with ``embed_images=True``). Its only JavaScript is the interactive map
  (:mod:`gpu_ops.report.interactive`: Plotly WebGL scatter to pan, zoom, hover for an image and its
  clusters, click for a cluster's members, colour by cluster, true label or outlier score), with
  plotly.js in ``figures/plotly.min.js`` (inlined with ``embed_images=True``).
  It also holds the metrics table (ACC, NMI, ARI, k, backend, cluster sizes), the backend each op
  ran on with every GPU → CPU fallback and its reason, timings per stage, and the settings.

Inputs (from :mod:`gpu_ops.pipeline` / :mod:`gpu_ops.rundir`): ``config.yaml``,
``assignments.parquet``, ``map2d.parquet``, ``metrics.json`` (its ``store`` gives the true
labels), and optionally ``outliers.parquet`` (``image_id``, ``score``: the map's outlier-score colouring), ``k_selection.json``, a linkage matrix per hierarchical algorithm, ``tsne_sweep.npz``
(:meth:`gpu_ops.reduce.tsne.PerplexitySweep.save` gives its contract) and ``reconstructions.npz``.
Images for montages and thumbnails come from re-opening the dataset that config.yaml names
(``load_dataset(dataset, split, limit)``) and looking each image_id up. Whatever is
absent or unusable (a deleted file, a moved dataset, a malformed array) is skipped, named in
:attr:`ReportResult.missing` with a one-line reason, and listed at the top of the page;
:class:`~gpu_ops.errors.InputError` is raised only when ``run_dir`` does not exist, has neither
``assignments.parquet`` nor ``metrics.json``, or has a ``metrics.json`` that is not valid (not JSON,
or a field of the wrong type; :mod:`gpu_ops.report.metrics_doc`).

``reconstructions.npz`` contract (written by autoencoder runs; the report shows inputs beside
their reconstructions)::

    inputs     float32/float64 (m, h, w) or (m, h, w, c), c in {1, 3}, values in [0, 1]
               (uint8 0..255 is accepted too)
    outputs    the autoencoder's reconstructions of ``inputs``: same shape, same value range
    image_ids  optional (m,) str: the store's image_id of each row

    m is small (the report shows the first 50 pairs; writers should save 10-100); out-of-range
    values are clipped; the file is saved with ``np.savez(path, inputs=..., outputs=...)`` and read
    with ``allow_pickle=False`` (so ``image_ids`` must be a unicode array, not objects).

The data behind each figure is computed by pure functions in :mod:`gpu_ops.report.data`
(:func:`montage_members`, :func:`thumbnail_positions`, :func:`confusion_for`, ...) so tests check
what a figure shows without reading pixels. :func:`summary_markdown` gives a short markdown
summary for a Prefect artifact.
"""

from gpu_ops.report.build import FIGURES_DIR, REPORT_NAME, ReportResult, build_report, summary_markdown
from gpu_ops.report.data import (
    Missing,
    RunInputs,
    cluster_composition,
    cluster_order,
    confusion_for,
    load_reconstructions,
    load_run,
    load_tsne_sweep,
    montage_members,
    thumbnail_positions,
)

__all__ = [
    "FIGURES_DIR",
    "REPORT_NAME",
    "Missing",
    "ReportResult",
    "RunInputs",
    "build_report",
    "cluster_composition",
    "cluster_order",
    "confusion_for",
    "load_reconstructions",
    "load_run",
    "load_tsne_sweep",
    "montage_members",
    "summary_markdown",
    "thumbnail_positions",
]
