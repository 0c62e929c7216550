"""Settings are checked in one place, RunConfig, before any work: the command line, YAML files and
deployment parameters get the same one-line error. Also the argparse errors, the size floors of
UMAP and t-SNE, the estimators' keywords, and a report's metrics.json."""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, run_cli
from flows.cli import main
from gpu_ops.config import RunConfig, load_config_file, make_config, validate_config
from gpu_ops.errors import InputError
from gpu_ops.registry import create_estimator, list_backends, list_ops


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


# ---------------------------------------------------------------- names


UNKNOWN_NAMES = [
    ({"extractor": "vgg"},
     "unknown extractor 'vgg'; expected one of: autoencoder, efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, "
     "raw, resnet18, resnet34, resnet50, timm:NAME, torchvision:NAME (or several backbones joined by +)"),
    ({"backend": "tpu"}, "unknown backend 'tpu'; expected one of: auto, cpu, gpu"),
    ({"backends": {"extract": "bogus"}}, "unknown extract backend 'bogus'; expected one of: auto, cpu, gpu"),
    ({"backends": {"kmeans": "nope"}},
     "unknown kmeans backend 'nope'; expected one of: auto, cpu, cuml, faiss-cpu, faiss-gpu, gpu, sklearn"),
    ({"backends": {"kmean": "cpu"}},
     "unknown op 'kmean' in backends; expected one of: agglomerative, dec, dkm, extract, gmm, hdbscan, idec, kmeans, knn, n2d, pca, scan, temi, tsne, turtle, umap"),
    ({"dataset": "cifar"}, "unknown dataset 'cifar'; expected digits or KIND:PATH with KIND one of: idx, folder, npz, "
     "npy, usps, parquet"),
]


@pytest.mark.parametrize("values, message", UNKNOWN_NAMES, ids=[str(v) for v, _ in UNKNOWN_NAMES])
def test_the_config_rejects_unknown_names(values, message):
    with pytest.raises(InputError) as info:
        make_config(**values)
    assert str(info.value) == message


def test_deployment_parameters_are_checked_before_the_flow_runs():
    """Prefect validates a deployment's `config` parameter into RunConfig: bad names fail there."""
    from prefect.exceptions import ParameterTypeError

    from flows.pipeline import cluster_images

    with pytest.raises(ParameterTypeError, match=r"unknown extract backend 'bogus'; expected one of: auto, cpu, gpu"):
        cluster_images.validate_parameters({"config": {"backend": "cpu", "backends": {"extract": "bogus"}}})
    with pytest.raises(ParameterTypeError, match=r"config\.extractor: .*unknown extractor 'vgg'"):
        cluster_images.validate_parameters({"config": {"extractor": "vgg"}})
    # JSON types (strings for paths, lists for pairs, ints for floats) are what deployments carry
    ok = cluster_images.validate_parameters({"config": {"out": "runs/x", "k": "auto", "k_range": [3, 8],
                                                        "timeouts": {"extract": 60}}})["config"]
    assert (ok.out, ok.k_range, ok.timeouts.extract) == (Path("runs/x"), (3, 8), 60.0)


def test_values_that_are_meant_to_convert_still_do(tmp_path):
    """Strings for paths (``~`` expanded), a comma string of algorithms, lists for pairs, ints for
    floats; prefect.yaml's deployments, configs/*.yaml and `gpuclust serve`'s JSON dump validate."""
    from flows.deploy import flow_parameters

    path = tmp_path / "ok.yaml"
    path.write_text("out: ~/runs/x\ncache_dir: cache\nalgorithms: kmeans, gmm\nk: auto\nk_range: [3, 9]\n"
                    "reducer: tsne\ntsne_perplexities: [10, 40]\ntimeouts: {extract: 60}\n")
    cfg = validate_config(load_config_file(path), file=path)
    assert cfg.out == Path.home() / "runs" / "x" and cfg.cache_dir == Path("cache")
    assert cfg.algorithms == ["kmeans", "gmm"] and cfg.k_range == (3, 9)
    assert cfg.tsne_perplexities == [10.0, 40.0] and cfg.timeouts.extract == 60.0
    for deployment in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        RunConfig.model_validate(deployment["parameters"]["config"])
    for path in sorted((REPO / "configs").glob("*.yaml")):
        validate_config(load_config_file(path), file=path)
    cfg = make_config(dataset="folder:/data/images", extractor="resnet18", weights="imagenet", decode_on_device=True,
                      algorithms="kmeans,agglomerative", linkage="average", k="auto", k_range=[3, 9],
                      reducer="tsne", tsne_perplexities=[10, 40], out="runs/x", task_runner={"kind": "dask"})
    dumped = flow_parameters(cfg)["config"]
    assert RunConfig.model_validate(dumped) == cfg
    # a full dump sets every field explicitly; options at their defaults never count as "given"
    assert make_config(**json.loads(make_config(dataset="npz:/x.npz").model_dump_json())).dataset == "npz:/x.npz"


# ---------------------------------------------------------------- types


def test_yaml_values_of_the_wrong_type_are_errors(tmp_path):
    cases = {
        "k: true": "k must be a positive integer or auto; got True",
        "k: '10'": "k must be a positive integer or auto; got '10'",
        "limit: '5'": "limit: Input should be a valid integer (got '5')",
        "seed: 1.5": "seed must be an integer from 0 to 4294967295; got 1.5",
        "batch_size: true": "batch_size: Input should be a valid integer (got True)",
        "decode_on_device: 1": "decode_on_device: Input should be a valid boolean (got 1)",
        "algorithms: [kmeans, 3]": "algorithms.1: Input should be a valid string (got 3)",
        "timeouts: {extract: '60'}": "timeouts.extract: Input should be a valid number (got '60')",
        "task_runner: {n_workers: true}": "task_runner.n_workers: Input should be a valid integer (got True)",
        "out: 5": "out: Input is not a valid path for <class 'pathlib.Path'> (got 5)",
    }
    for i, (text, message) in enumerate(cases.items()):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(text + "\n")
        with pytest.raises(InputError) as info:
            validate_config(load_config_file(path), file=path)
        assert str(info.value) == f"{path}: {message}", text


def test_a_config_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("dataset: digits\n# r\u00e9glages\n".encode("latin-1"))
    with pytest.raises(InputError) as info:
        load_config_file(path)
    assert str(info.value) == f"{path}: not UTF-8 text (byte 0xe9 on line 2); save the config file as UTF-8"


# ---------------------------------------------------------------- ranges


def test_seed_must_be_in_numpys_range():
    for seed in (-1, 2**32, True, 1.5):
        with pytest.raises(InputError) as info:
            make_config(seed=seed)
        assert str(info.value) == f"seed must be an integer from 0 to 4294967295; got {seed!r}"
    assert make_config(seed=0).seed == 0 and make_config(seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("k", [0, -3, True, 2.0, "ten"])
def test_k_must_be_positive_or_auto(k):
    with pytest.raises(InputError) as info:
        make_config(k=k)
    assert str(info.value) == f"k must be a positive integer or auto; got {k!r}"


@pytest.mark.parametrize("k_range", [[1, 5], [6, 3], [2], [2, "9"], "2-9"])
def test_k_range_must_be_a_sane_pair(k_range):
    with pytest.raises(InputError) as info:
        make_config(k="auto", k_range=k_range)
    assert str(info.value) == f"k_range must be two integers [low, high] with 2 <= low <= high; got {k_range!r}"


# ---------------------------------------------------------------- options that do not apply


NOT_APPLYING = [
    (["--split", "test"],
     "--split does not apply to the digits dataset; it is for idx: and usps: datasets (the others have no train/test split)"),
    (["--dataset", "npz:/x.npz", "--split", "train"],
     "--split does not apply to npz: datasets; it is for idx: and usps: datasets (the others have no train/test split)"),
    (["--dataset", "parquet:/x", "--split", "train"],
     "--split does not apply to parquet: datasets; it is for idx: and usps: datasets (the others have no train/test split)"),
    (["--gpu-decode"],
     "--gpu-decode does not apply to the digits dataset; it is for JPEG folders (folder: datasets) with a pretrained extractor"),
    (["--dataset", "folder:/x", "--gpu-decode"],
     "--gpu-decode does not apply to extractor raw; it is for JPEG folders (folder: datasets) with a pretrained extractor"),
    (["--latent-dim", "16"], "--latent-dim does not apply to extractor raw with algorithms umap-graph; it is for the "
     "autoencoder extractor and the deep algorithms (n2d, dkm, dec, idec)"),
    (["--ae-epochs", "5", "--extractor", "resnet18"],
     "--ae-epochs does not apply to extractor resnet18; it is for the autoencoder extractor"),
    (["--deep-epochs", "5"], "--deep-epochs does not apply to algorithms umap-graph; it is for the deep algorithms "
     "(n2d, dkm, dec, idec)"),
    (["--linkage", "single", "--algorithm", "kmeans"],
     "--linkage does not apply to algorithms kmeans; it is for agglomerative"),
    (["--weights", "none"],
     "--weights does not apply to extractor raw; it is for the pretrained extractors (every one but raw and autoencoder)"),
]


@pytest.mark.parametrize("args, message", NOT_APPLYING, ids=[" ".join(a) for a, _ in NOT_APPLYING])
def test_an_option_that_does_not_apply_is_an_error(args, message, capsys, tmp_path):
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 2
    assert _error_line(capsys) == f"gpuclust: error: {message}"


def test_options_that_apply_or_keep_their_defaults_are_fine_and_yaml_names_the_file(tmp_path):
    make_config(dataset="idx:/m", split="test")
    make_config(dataset="usps:/u.h5", split="train")
    make_config(dataset="folder:/x", extractor="resnet50", decode_on_device=True, weights="imagenet")
    make_config(extractor="autoencoder", latent_dim=16, ae_epochs=5)
    make_config(algorithms="idec", latent_dim=16, deep_epochs=5)
    make_config(algorithms="agglomerative", linkage="single", distance_threshold=2.0)
    # given, but at the default: nothing to object to
    make_config(dataset="folder:/x", split="all", linkage="ward", decode_on_device=False, weights=None)
    path = tmp_path / "run.yaml"
    path.write_text("dataset: folder:/x\nsplit: test\n")
    with pytest.raises(InputError) as info:
        validate_config(load_config_file(path), file=path)
    assert str(info.value) == (f"{path}: split does not apply to folder: datasets; it is for idx: and usps: datasets "
                               "(the others have no train/test split)")


# ---------------------------------------------------------------- the algorithms' own settings


BAD_ALGORITHM_OPTIONS = [
    (["--algorithm", "scan", "--algorithm-option", "scan.n_head=20"],
     "--algorithm-option scan: unknown scan option(s) 'n_head'; expected some of: batch_size, class_balance, confidence, "
     "consensus, entropy_weight, epochs, hidden, l2_normalize, lr, n_heads, neighbors, pca_dim, progress, selflabel_epochs, "
     "weight_decay, whiten"),
    (["--algorithm", "temi", "--algorithm-option", "temi.beta=0"], "--algorithm-option temi: temi beta must be a number in (0, 1]; got 0"),
    (["--algorithm", "idec", "--algorithm-option", "idec.dec_max_iter=many"],
     "--algorithm-option idec: deep clustering option dec_max_iter must be an integer; got 'many'"),
    (["--algorithm", "idec", "--algorithm-option", "idec.arch=resnet"],
     "--algorithm-option idec: deep clustering option arch must be one of dense, conv; got 'resnet'"),
    (["--algorithm", "kmeans", "--algorithm-option", "kmeans.n_init=3"],
     "--algorithm-option: 'kmeans' has no options to set; the algorithms that do: n2d, dkm, dec, idec, scan, temi, turtle"),
    (["--algorithm", "kmeans", "--algorithm-option", "scan.n_heads=3"],
     "--algorithm-option scan does not apply to algorithms kmeans; it is for runs of scan"),
    (["--algorithm", "scan", "--algorithm-option", "scan"],
     "argument --algorithm-option: expected ALGORITHM.NAME=VALUE (e.g. scan.n_heads=20); got 'scan'"),
]


@pytest.mark.parametrize("args, message", BAD_ALGORITHM_OPTIONS, ids=[a[-1] for a, _ in BAD_ALGORITHM_OPTIONS])
def test_a_bad_algorithm_option_is_one_line_before_any_work(args, message, capsys, tmp_path):
    try:
        code = main(["run", *args, "--out", str(tmp_path / "run")])
    except SystemExit as exc:  # argparse's own check
        code = exc.code
    assert code == 2
    assert _error_line(capsys) == f"gpuclust: error: {message}"
    assert not (tmp_path / "run").exists()


def test_algorithm_options_from_a_file_and_the_command_line_merge(tmp_path):
    from flows.cli import build_parser, run_config_from_args

    path = tmp_path / "run.yaml"
    path.write_text("algorithms: [scan, idec]\nalgorithm_options:\n  scan: {n_heads: 4, hidden: 64}\n  idec: {augment: false}\n")
    args = build_parser().parse_args(["run", "--config", str(path), "--algorithm-option", "scan.n_heads=8",
                                      "--algorithm-option", "idec.hidden=[256, 256, 1024]"])
    cfg = run_config_from_args(args)
    assert cfg.options_for("scan") == {"n_heads": 8, "hidden": 64}
    assert cfg.options_for("idec") == {"augment": False, "hidden": [256, 256, 1024]}
    assert cfg.options_for("kmeans") == {}
    path.write_text("algorithms: [scan]\nalgorithm_options:\n  scan: {epochs: -1}\n")
    with pytest.raises(InputError) as info:
        validate_config(load_config_file(path), file=path)
    assert str(info.value) == f"{path}: algorithm_options scan: scan epochs must be an integer >= 0; got -1"


# ---------------------------------------------------------------- the command line


def test_argument_errors_are_one_line_and_help_is_unchanged(capsys):
    # how argparse quotes the choices differs between Python versions: compare up to them
    for args, message in [(["run", "--limit", "abc"], "argument --limit: invalid int value: 'abc'"),
                          (["run", "--split", "dev"], "argument --split: invalid choice: 'dev' (choose from "),
                          (["run", "--backend", "cpu,gpu"], "argument --backend: two backends for every op ('cpu', "
                                                            "'gpu') in 'cpu,gpu'"),
                          (["frobnicate"], "argument command: invalid choice: 'frobnicate' (choose from ")]:
        with pytest.raises(SystemExit) as info:
            main(args)
        assert info.value.code == 2
        line = _error_line(capsys)
        assert line == f"gpuclust: error: {message}" or (message.endswith("from ")
                                                        and line.startswith(f"gpuclust: error: {message}")), line
    with pytest.raises(SystemExit) as info:
        main(["run", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: gpuclust run") and "--seed SEED" in out


def test_cli_flags_are_named_in_messages(capsys, tmp_path):
    assert main(["run", "--dask-workers", "0", "--out", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == "gpuclust: error: --dask-workers: Input should be greater than or equal to 1 (got 0)"
    assert main(["run", "--backend", "cpu,kmean=sklearn", "--out", str(tmp_path / "r")]) == 2
    assert _error_line(capsys) == ("gpuclust: error: unknown op 'kmean' in --backend; expected one of: agglomerative, "
                                   "dec, dkm, extract, gmm, hdbscan, idec, kmeans, knn, n2d, pca, scan, temi, tsne, turtle, umap")
    assert gc.isenabled()  # a run that stops during its start-up collects garbage again afterwards


# ---------------------------------------------------------------- size floors of UMAP and t-SNE


FLOORS = [
    (["--limit", "5", "--k", "2", "--algorithm", "umap-kmeans"],
     "umap-kmeans (UMAP to umap_dims=10 dimensions) needs at least 12 images; digits has 5 (limit 5)"),
    (["--limit", "3", "--k", "2", "--algorithm", "kmeans", "--reducer", "umap"],
     "the umap map (reducer umap) needs at least 4 images; digits has 3 (limit 3)"),
    (["--limit", "6", "--k", "2", "--algorithm", "kmeans", "--reducer", "tsne"],
     "the tsne map (reducer tsne) needs at least 7 images; digits has 6 (limit 6)"),
    (["--limit", "2", "--k", "auto", "--algorithm", "kmeans", "--reducer", "pca"],
     "k=auto tries k from 2: it needs more than 2 images; digits has 2"),
]


@pytest.mark.parametrize("args, message", FLOORS, ids=[" ".join(a) for a, _ in FLOORS])
def test_too_few_images_for_umap_or_tsne_is_refused_before_any_work(args, message, capsys, tmp_path):
    assert main(["run", *args, "--out", str(tmp_path / "run")]) == 2
    assert _error_line(capsys) == f"gpuclust: error: {message}"


def test_the_floors_are_the_real_minimum():
    """At the floor preflight lets the run go and the estimator runs as the pipeline calls it; one
    image fewer, preflight refuses what the estimator cannot do."""
    from sklearn.datasets import load_digits

    from flows.cli import preflight

    X = load_digits().data.astype(np.float32)
    for settings, op, params in [({"algorithms": "umap-kmeans", "reducer": "none"}, "umap",
                                  {"n_components": 10, "min_dist": 0.0}),
                                 ({"algorithms": "kmeans", "reducer": "umap"}, "umap",
                                  {"n_components": 2, "min_dist": 0.1}),
                                 ({"algorithms": "kmeans", "reducer": "tsne"}, "tsne", {"n_components": 2})]:
        floor = 12 if params["n_components"] == 10 else (4 if op == "umap" else 7)
        for n in (floor, floor - 1):
            size = ({"n_neighbors": min(15, n - 1)} if op == "umap"
                    else {"perplexity": min(30.0, max(2.0, (n - 1) / 3.5))})
            est, _ = create_estimator(op, "cpu", seed=0, **params, **size)
            cfg = make_config(limit=n, k=2, **settings)
            if n == floor:
                preflight(cfg)
                assert np.isfinite(est.fit(X[:n]).embedding_).all(), (settings, n)
            else:
                with pytest.raises(InputError, match=f"needs at least {floor} images; digits has {n}"):
                    preflight(cfg)
                with pytest.raises(Exception):  # noqa: B017 - whatever the library raises
                    est.fit(X[:n])


# ---------------------------------------------------------------- estimator keywords


def test_a_misspelt_estimator_keyword_is_named_with_the_valid_ones():
    with pytest.raises(InputError) as info:
        create_estimator("kmeans", "cpu", n_clusters=3, n_inits=5)
    assert str(info.value) == ("unknown kmeans parameter 'n_inits'; expected one of: gpu, init, init_sample, max_iter, "
                               "max_points_per_centroid, n_clusters, n_init, n_seedings, seed")
    with pytest.raises(InputError, match=r"^unknown umap parameter 'n_neighbours'; expected one of: knn, metric, "):
        create_estimator("umap", "cpu", n_neighbours=5)


def test_every_backend_names_its_keywords_and_gets_only_its_own():
    """No backend swallows unknown keywords (``**kwargs``): each states what it takes. A keyword of
    another backend of the op (cuML's ``connectivity``) is valid for the op and not passed on."""
    for op in list_ops():
        for spec in list_backends(op):
            assert spec.keywords() is not None, (op, spec.name)
    from gpu_ops.cluster.kmeans import SklearnKMeans

    with pytest.raises(TypeError, match="n_inits"):
        SklearnKMeans(n_clusters=3, n_inits=5)
    est, res = create_estimator("agglomerative", "sklearn", n_clusters=3, connectivity="knn")
    assert res.backend == "sklearn" and est.n_clusters == 3


# ---------------------------------------------------------------- report: metrics.json


BAD_METRICS = [
    ('{"dataset": "digits", "n": "abc", "algorithms": {}}',
     "metrics.json: field n: Input should be a valid integer (got 'abc')"),
    ('{"dataset": "digits", "n": 10, "algorithms": []}',
     "metrics.json: field algorithms: Input should be an object (got [])"),
    ('{"dataset": "digits", "n": 10, "algorithms": {"kmeans": {"k": "ten"}}}',
     "metrics.json: field algorithms.kmeans.k: Input should be a valid integer (got 'ten')"),
    ('{"dataset": "digits", "algorithms": {}}', "metrics.json: field n is missing"),
    ('{"dataset": "digits", "n": 10,', "metrics.json: not valid JSON (EOF while parsing a value at line 1 column 30)"),
    ('[1, 2]', "metrics.json: expected a JSON object of run metrics (Input should be an object)"),
]


@pytest.mark.parametrize("text, message", BAD_METRICS, ids=[m for _, m in BAD_METRICS])
def test_report_on_a_bad_metrics_json_is_one_line(text, message, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(text)
    assert main(["report", str(run)]) == 2
    assert _error_line(capsys) == f"gpuclust: error: {run}/{message}"
    assert not (run / "report.html").exists() and not (run / "figures").exists()


# ---------------------------------------------------------------- the real command, before any work


def _nothing_done(cache: Path, out: Path) -> None:
    assert not cache.exists(), sorted(p.name for p in cache.rglob("*"))
    assert not out.exists()


@pytest.fixture
def scratch_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPUCLUST_CACHE", str(cache))
    return cache


def _npz(tmp_path: Path) -> Path:
    path = tmp_path / "small.npz"
    rng = np.random.default_rng(0)
    np.savez(path, X=rng.normal(size=(40, 4)).astype(np.float32), y=np.arange(40) % 2)
    return path


def test_cli_refuses_bad_settings_in_one_line_before_any_work(tmp_path, scratch_cache):
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"dataset: digits\n# r\xe9glages\n")
    npz = _npz(tmp_path)
    cases = [
        (["--limit", "abc"], "argument --limit: invalid int value: 'abc'"),
        (["--seed", "-1"], "--seed must be an integer from 0 to 4294967295; got -1"),
        (["--seed", "4294967296"], "--seed must be an integer from 0 to 4294967295; got 4294967296"),
        (["--k", "0"], "--k must be a positive integer or auto; got 0"),
        (["--dataset", f"npz:{npz}", "--split", "test", "--k", "2"],
         "--split does not apply to npz: datasets; it is for idx: and usps: datasets (the others have no train/test split)"),
        (["--backend", "cpu,extract=bogus"], "unknown extract backend 'bogus'; expected one of: auto, cpu, gpu"),
        (["--config", str(latin1)], f"{latin1}: not UTF-8 text (byte 0xe9 on line 2); save the config file as UTF-8"),
    ]
    for args, message in cases:
        out = tmp_path / "run"
        t0 = time.perf_counter()
        result = run_cli(["run", *args, "--out", str(out)], timeout=300)
        seconds = time.perf_counter() - t0
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stderr.strip().splitlines() == [f"gpuclust: error: {message}"], (args, result.stderr[-2000:])
        _nothing_done(scratch_cache, out)
        assert seconds < 60, (args, seconds)
