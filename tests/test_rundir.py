"""Run directories never destroy what gpuclust did not write: ``--out`` checks, the run marker,
clean-up of killed runs' leftovers, and runs inside a dataset folder not read back as images."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import run_cli

from gpu_ops.config import load_config_file, make_config
from gpu_ops.data import load_dataset
from gpu_ops.errors import InputError
from gpu_ops.rundir import (
    OUT_RULE,
    RUN_MARKER,
    STAGING_MARKER,
    check_out_dir,
    commit_run,
    default_run_dir,
    is_run_dir,
    remove_leftovers,
    start_run,
)

FAST = ["--reducer", "none", "--algorithm", "kmeans", "--extractor", "raw"]


def snapshot(root: Path) -> dict[str, str]:
    """Every directory and file under ``root`` (hidden ones too), files by SHA-256 of their bytes."""
    seen: dict[str, str] = {}
    for top, dirs, files in os.walk(root):
        for name in dirs:
            seen[os.path.relpath(os.path.join(top, name), root)] = "dir"
        for name in files:
            path = os.path.join(top, name)
            seen[os.path.relpath(path, root)] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return seen


def copy_photos(cifar_folder: Path, dest: Path, classes: tuple[str, ...] = ("airplane", "cat"),
                per_class: int = 10) -> Path:
    """A small labelled image folder: ``per_class`` real CIFAR-10 JPEGs in each class subfolder."""
    for cls in classes:
        (dest / cls).mkdir(parents=True)
        for src in sorted((cifar_folder / cls).iterdir())[:per_class]:
            shutil.copyfile(src, dest / cls / src.name)
    return dest


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def make_staging(parent: Path, name: str, owner: dict | None) -> Path:
    """A staging directory as a run leaves it when killed: a part file, and its owner's marker."""
    staging = parent / name
    staging.mkdir()
    (staging / "assignments.parquet").write_bytes(b"half-written")
    if owner is not None:
        (staging / STAGING_MARKER).write_text(json.dumps(owner))
    return staging


@pytest.fixture()
def scratch(tmp_path: Path, cifar_folder: Path) -> dict[str, Path]:
    """A scratch home and working directory holding things a user would hate to lose."""
    home, work = tmp_path / "home", tmp_path / "work"
    (home / "docs").mkdir(parents=True)
    (home / ".bashrc").write_text("export EDITOR=vi\n")
    (home / "docs" / "cv.txt").write_text("curriculum vitae\n")
    (work / ".git").mkdir(parents=True)
    (work / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (work / "thesis" / "figs").mkdir(parents=True)
    (work / "thesis" / "chapter1.tex").write_text("\\chapter{Introduction}\n")
    shutil.copyfile(next((cifar_folder / "dog").iterdir()), work / "thesis" / "figs" / "dog.jpg")
    (work / "notes.txt").write_text("a file, not a directory\n")
    copy_photos(cifar_folder, work / "photos")
    (work / "cache" / "stores").mkdir(parents=True)
    (work / "cache" / "stores" / "manifest.json").write_text("{}")
    return {"home": home, "work": work, "cache": work / "cache", "tmp": tmp_path}


# ---------------------------------------------------------------- the command line refuses

# (--out as typed, the path the message names relative to the scratch working directory or None
# for an absolute one, the reason)
REFUSALS = [
    ("thesis", "thesis", f"is a directory that gpuclust did not write (not empty, no {RUN_MARKER} file)"),
    (".", ".", "is the working directory"),
    ("/", None, "is the filesystem root"),
    ("HOME", None, "is your home directory"),
    ("~", None, "is your home directory"),
    ("photos", "photos", "is the dataset folder:photos"),
    ("photos/airplane", "photos/airplane", "is inside the dataset folder:photos"),
    ("photos/run1", "photos/run1", "is inside the dataset folder:photos"),
    ("cache", "cache", "is the cache CACHE"),
    ("cache/run1", "cache/run1", "is inside the cache CACHE"),
    ("notes.txt", "notes.txt", "is a file, not a directory"),
    ("notes.txt/run1", "notes.txt/run1", "cannot be created: WORK/notes.txt is not a directory"),
]


@pytest.mark.parametrize("out, named, reason", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_cli_refuses_out_and_touches_nothing(scratch, out, named, reason):
    work, home, cache = scratch["work"], scratch["home"], scratch["cache"]
    out_arg = str(home) if out == "HOME" else out
    path = work.resolve() / named if named else (Path("/") if out == "/" else home)
    before, root_before = snapshot(scratch["tmp"]), sorted(os.listdir("/"))
    result = run_cli(["run", "--dataset", "folder:photos", *FAST, "--out", out_arg], cwd=work,
                     env={"HOME": str(home), "GPUCLUST_CACHE": str(cache)}, timeout=300)
    reason = reason.replace("CACHE", str(cache)).replace("WORK", str(work.resolve()))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"gpuclust: error: {path}: {reason}; {OUT_RULE}"]
    assert snapshot(scratch["tmp"]) == before
    assert sorted(os.listdir("/")) == root_before


def test_cli_refuses_an_empty_out(scratch):
    """argparse would turn "" into Path("") == Path("."): the working directory."""
    before = snapshot(scratch["tmp"])
    result = run_cli(["run", *FAST, "--out", ""], cwd=scratch["work"], env={"HOME": str(scratch["home"])},
                     timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == ['gpuclust: error: --out: "" is an empty path; name a directory']
    assert snapshot(scratch["tmp"]) == before


# ---------------------------------------------------------------- the check itself (no pipeline)

def test_check_accepts_a_new_path_an_empty_directory_and_an_earlier_run(scratch, monkeypatch):
    work = scratch["work"]
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(scratch["home"]))
    assert check_out_dir("runs/new/deep") == work / "runs" / "new" / "deep"
    assert check_out_dir("~/runs/x") == scratch["home"] / "runs" / "x"
    (work / "empty").mkdir()
    assert check_out_dir("empty", "folder:photos", scratch["cache"]) == work / "empty"
    (work / "earlier").mkdir()
    (work / "earlier" / "metrics.json").write_text("{}")
    (work / "earlier" / RUN_MARKER).write_text("{}")
    assert check_out_dir(work / "earlier", "folder:photos", scratch["cache"]) == work / "earlier"
    assert check_out_dir(work / "photos-run", "folder:photos", scratch["cache"]) == work / "photos-run"


def refusal(out, dataset: str | None, cache: Path | None) -> str:
    """The message ``check_out_dir`` refuses ``out`` with."""
    with pytest.raises(InputError) as exc:
        check_out_dir(out, dataset, cache)
    return str(exc.value)


def test_check_refuses_what_the_command_line_cannot_reach(scratch, monkeypatch):
    work, cache = scratch["work"], scratch["cache"]
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(scratch["home"]))
    # an earlier run that holds the dataset (or the cache): replacing it would delete them
    run = work / "earlier"
    (run / "data").mkdir(parents=True)
    (run / RUN_MARKER).write_text("{}")
    assert refusal(run, "folder:earlier/data", cache) == f"{run}: contains the dataset folder:earlier/data; {OUT_RULE}"
    assert refusal(run, "digits", run / "cache") == f"{run}: contains the cache {run / 'cache'}; {OUT_RULE}"
    # an array file is the dataset; its folder's siblings are fine
    np_file = work / "arrays.npz"
    np_file.write_bytes(b"x")
    assert refusal(np_file, f"npz:{np_file}", cache) == f"{np_file}: is the dataset npz:{np_file}; {OUT_RULE}"
    assert check_out_dir(work / "arrays-run", f"npz:{np_file}", cache) == work / "arrays-run"
    # a link to a folder that is not a run is that folder
    (work / "link").symlink_to(work / "thesis")
    assert refusal("link", "digits", cache) == (f"{work / 'link'}: is a directory that gpuclust did not write "
                                                f"(not empty, no {RUN_MARKER} file); {OUT_RULE}")
    # a folder that holds the working directory, or the home directory
    monkeypatch.chdir(work / "thesis")
    assert refusal("..", "digits", cache) == f"{work}: contains the working directory; {OUT_RULE}"
    assert refusal("../..", "digits", cache) == f"{work.parent}: contains your home directory; {OUT_RULE}"
    assert refusal("", "digits", cache) == f'--out "": an empty path is not a run directory; {OUT_RULE}'


def test_config_expands_home_and_refuses_empty_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("out: ~/runs/x\ncache_dir: ~/cache\n")
    cfg = make_config(**load_config_file(yaml_file))
    assert cfg.out == tmp_path / "runs" / "x" and cfg.cache_root() == tmp_path / "cache"
    with pytest.raises(InputError, match='^out: "" is an empty path; name a directory$'):
        make_config(out="")
    with pytest.raises(InputError, match='^cache_dir: "" is an empty path; name a directory$'):
        make_config(cache_dir=" ")


def test_the_flow_checks_out_too(scratch, monkeypatch):
    """Deployments call the flow without the command line: it refuses before any work too."""
    from flows.pipeline import cluster_images

    monkeypatch.chdir(scratch["work"])
    before = snapshot(scratch["tmp"])
    cfg = make_config(dataset="folder:photos", out="thesis", cache_dir=scratch["cache"])
    with pytest.raises(InputError) as exc:
        cluster_images.fn(cfg)
    assert str(exc.value).startswith(f"{scratch['work'] / 'thesis'}: is a directory that gpuclust did not write")
    assert snapshot(scratch["tmp"]) == before


def test_runs_started_in_the_same_second_get_their_own_default_folders(tmp_path, monkeypatch):
    """Without ``--out`` the run folder is named by the second it started: a second run in that
    second takes ``-2`` (the folder is made at once, so the later commit cannot replace the earlier
    run), and a run that fails before committing leaves no empty folder behind."""
    from flows.pipeline import cluster_images

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20261130-120000")
    first, second = default_run_dir("digits"), default_run_dir("idx:/data/mnist")
    third = default_run_dir("digits")
    assert [first, second, third] == [Path("runs/20261130-120000-digits"), Path("runs/20261130-120000-idx"),
                                      Path("runs/20261130-120000-digits-2")]
    assert all(p.is_dir() and not any(p.iterdir()) for p in (first, second, third))
    with pytest.raises(InputError):  # fails after its folder was made: a store path that is a file
        (tmp_path / "cache").write_text("a file")
        cluster_images.fn(make_config(dataset="digits", cache_dir=tmp_path / "cache"))
    assert sorted(p.name for p in Path("runs").iterdir()) == sorted([first.name, second.name, third.name])


# ---------------------------------------------------------------- staging, commit, leftovers

def test_commit_replaces_an_earlier_run_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    first = start_run(out)
    (first / "metrics.json").write_text('{"n": 1}')
    commit_run(first, out)
    marker = json.loads((out / RUN_MARKER).read_text())
    assert is_run_dir(out) and not (out / STAGING_MARKER).exists()

    second = start_run(out)
    (second / "metrics.json").write_text('{"n": 2}')
    commit_run(second, out)
    assert (out / "metrics.json").read_text() == '{"n": 2}'
    assert json.loads((out / RUN_MARKER).read_text())["run_id"] != marker["run_id"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging, no .run.old-*

    # files that appeared at out while the run was being written are not ours: never replaced
    third = start_run(out)
    (third / "metrics.json").write_text('{"n": 3}')
    shutil.rmtree(out)
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(InputError) as exc:
        commit_run(third, out)
    assert str(exc.value) == f"{out}: not replaced: it now holds files that gpuclust did not write; " \
                             f"the finished run is in {third}"
    assert snapshot(out) == {"thesis.tex": hashlib.sha256(b"mine").hexdigest()}
    assert is_run_dir(third) and not (third / STAGING_MARKER).exists()  # kept: no later run removes it


def test_leftovers_of_dead_runs_go_the_rest_stays(tmp_path):
    host = socket.gethostname()
    dead = make_staging(tmp_path, ".run.partial-deadbeef", {"pid": dead_pid(), "host": host})
    live = make_staging(tmp_path, ".run.partial-0123abcd", {"pid": os.getpid(), "host": host})
    elsewhere = make_staging(tmp_path, ".run.partial-4567cdef", {"pid": dead_pid(), "host": host + "-other"})
    unmarked = make_staging(tmp_path, ".thesis.partial-89abcdef", None)
    zombie_proc = subprocess.Popen(["sleep", "60"])
    zombie_proc.kill()  # killed, not reaped yet: a zombie still answers kill(pid, 0)
    stat = Path(f"/proc/{zombie_proc.pid}/stat")
    deadline = time.monotonic() + 10
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z" and time.monotonic() < deadline:
        time.sleep(0.05)
    zombie = make_staging(tmp_path, ".other.partial-aaaabbbb", {"pid": zombie_proc.pid, "host": host})
    old_run = tmp_path / ".run.old-12345678"
    old_run.mkdir()
    (old_run / RUN_MARKER).write_text("{}")
    (old_run / "metrics.json").write_text("{}")
    (tmp_path / ".run.old-87654321").mkdir()  # an empty directory moved aside
    old_unmarked = tmp_path / ".photos.old-11112222"
    old_unmarked.mkdir()
    (old_unmarked / "photo.jpg").write_bytes(b"jpeg")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "chapter1.tex").write_text("mine")
    kept = [live, elsewhere, unmarked, old_unmarked, tmp_path / "thesis"]
    before = {p.name: snapshot(p) for p in kept}
    try:
        removed = remove_leftovers(tmp_path)
    finally:
        zombie_proc.wait()
    assert sorted(p.name for p in removed) == sorted([dead.name, zombie.name, old_run.name, ".run.old-87654321"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    assert {p.name: snapshot(p) for p in kept} == before


def test_folder_dataset_skips_runs_and_hidden_folders(tmp_path, cifar_folder):
    photos = copy_photos(cifar_folder, tmp_path / "photos")
    want = load_dataset(f"folder:{photos}")
    run = photos / "run1"
    (run / "figures").mkdir(parents=True)
    for name in ("map.png", "figures/map-kmeans.png", "figures/montage-kmeans-c0.png"):
        shutil.copyfile(next((cifar_folder / "dog").iterdir()), run / name)
    (run / RUN_MARKER).write_text("{}")
    staging = photos / ".run2.partial-0123abcd"
    staging.mkdir()
    shutil.copyfile(next((cifar_folder / "dog").iterdir()), staging / "map.png")
    got = load_dataset(f"folder:{photos}")
    assert len(want) == len(got) == 20
    assert got.image_ids == want.image_ids and got.class_names == ["airplane", "cat"]
    assert list(got.labels) == [0] * 10 + [1] * 10


# ---------------------------------------------------------------- whole runs (the pipeline)

def test_runs_in_a_shared_folder(prefect_server, scratch):
    """Into an empty directory inside a photo folder, beside leftovers of other runs; again into
    the same run; then the photo folder itself is clustered: the run inside is not data."""
    work, home = scratch["work"], scratch["home"]
    photos, run1 = work / "photos", work / "photos" / "run1"
    run1.mkdir()
    host = socket.gethostname()
    dead = make_staging(photos, ".run1.partial-deadbeef", {"pid": dead_pid(), "host": host})
    live = make_staging(photos, ".run1.partial-0123abcd", {"pid": os.getpid(), "host": host})
    unmarked = make_staging(photos, ".thesis.partial-89abcdef", None)
    before = {p.name: snapshot(p) for p in (live, unmarked, photos / "airplane", photos / "cat")}
    env = {"HOME": str(home), "GPUCLUST_CACHE": str(scratch["tmp"] / "gpuclust-cache")}

    result = run_cli(["run", "--limit", "200", *FAST, "--out", "photos/run1"], cwd=work, env=env,
                     api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run1 / "metrics.json").read_text())["n"] == 200
    first_id = json.loads((run1 / RUN_MARKER).read_text())["run_id"]
    assert not dead.exists()
    assert sorted(p.name for p in photos.iterdir()) == sorted(["airplane", "cat", "run1", live.name, unmarked.name])
    assert {p.name: snapshot(p) for p in (live, unmarked, photos / "airplane", photos / "cat")} == before
    page = (run1 / "report.html").read_text()
    assert ".partial-" not in page and f"run directory <code>{run1.resolve()}</code>" in page

    (run1 / "stale.txt").write_text("from the earlier run")
    result = run_cli(["run", "--limit", "200", *FAST, "--out", "photos/run1"], cwd=work, env=env,
                     api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((run1 / RUN_MARKER).read_text())["run_id"] != first_id
    assert not (run1 / "stale.txt").exists()
    assert sorted(p.name for p in photos.iterdir()) == sorted(["airplane", "cat", "run1", live.name, unmarked.name])

    result = run_cli(["run", "--dataset", "folder:photos", *FAST, "--k", "2", "--out", "photos-run"], cwd=work,
                     env=env, api_url=prefect_server["url"])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((work / "photos-run" / "metrics.json").read_text())
    assert metrics["n"] == 20 and "acc" in metrics["algorithms"]["kmeans"]  # labels from the class folders
