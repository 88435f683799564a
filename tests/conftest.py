"""Shared fixtures: a real local Ray cluster, a real HTTP S3 endpoint on loopback (moto server), and images of
every kind a user's collection may hold, good and bad."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ARTNET_SHARED", REPO.parent / "shared"))
PAINTINGS = SHARED / "data" / "paintings"
WEIGHTS = SHARED / "weights"

requires_paintings = pytest.mark.skipif(not PAINTINGS.is_dir(), reason=f"real paintings not found at {PAINTINGS} "
                                        "(set ARTNET_SHARED to the shared/ folder)")
requires_weights = pytest.mark.skipif(not WEIGHTS.is_dir(), reason=f"pretrained weights not found at {WEIGHTS} "
                                      "(set ARTNET_SHARED to the shared/ folder)")


def jpeg_bytes(arr: np.ndarray, mode: str | None = None, quality: int = 90) -> bytes:
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def painting(seed: int, size=(96, 80), colour=None) -> np.ndarray:
    """A random RGB picture; `colour` biases it so painters differ."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3)).astype(np.float32)
    if colour is not None:
        arr = 0.3 * arr + 0.7 * np.array(colour, np.float32)
    return arr.astype(np.uint8)


def bad_files() -> dict[str, bytes]:
    """name -> bytes for every kind of bad input, each under an image file name. Reason tag in the name."""
    good = jpeg_bytes(painting(1))
    bomb = Image.new("1", (9000, 8000))  # 72M pixels: over the 64M default limit, ~1 kB as PNG
    return {
        "zero_byte.jpg": b"",
        "not_an_image.jpg": b"this is a text file, not a painting\n" * 20,
        "truncated.jpg": good[: len(good) // 2],
        "corrupt.jpg": good[:200] + bytes(np.random.default_rng(0).integers(0, 255, 2000, dtype=np.uint8)),
        "huge.png": png_bytes(bomb),
        "html.jpg": b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>Access denied</body></html>",
    }


def odd_but_good_files() -> dict[str, bytes]:
    """Valid images in modes other than 8-bit RGB: each must decode to RGB."""
    arr = painting(2)
    rgba = Image.fromarray(arr).convert("RGBA")
    rgba.putalpha(128)
    palette = Image.fromarray(arr).convert("P")
    palette.info["transparency"] = 0
    return {
        "grey.jpg": jpeg_bytes(arr, "L"),
        "cmyk.jpg": jpeg_bytes(arr, "CMYK"),
        "alpha.png": png_bytes(rgba),
        "palette.png": png_bytes(palette),
        "sixteen_bit.png": png_bytes(Image.fromarray((arr[..., 0].astype(np.uint16) * 257))),
        "animated.gif": gif_bytes([Image.fromarray(arr), Image.fromarray(255 - arr)]),
        "exif_rotated.jpg": exif_rotated_jpeg(arr),
        "one_pixel.png": png_bytes(Image.new("RGB", (1, 1), (200, 30, 60))),
        "extreme_aspect.png": png_bytes(Image.fromarray(arr).resize((arr.shape[1] * 8, 4))),
    }


def gif_bytes(frames: list) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def exif_rotated_jpeg(arr: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to display"), as cameras write."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def write_folder_set(root: Path, painters: dict[str, int], extra: dict[str, dict[str, bytes]] | None = None) -> None:
    """`root/<painter>/<painter>_<n>.jpg` with `painters[name]` images each; `extra` adds files per painter."""
    for p_index, (name, count) in enumerate(painters.items()):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)][p_index % 4]
        for n in range(count):
            (folder / f"{name}_{n + 1}.jpg").write_bytes(jpeg_bytes(painting(p_index * 1000 + n, colour=colour)))
        for fname, data in (extra or {}).get(name, {}).items():
            (folder / fname).write_bytes(data)


def write_small_catalog(root: Path) -> str:
    """3 synthetic painters x 24 small paintings plus two bad files, catalogued 60/20/20 under `root/catalog`."""
    from artnet.config import CatalogConfig
    from artnet.data import catalog, demo_data

    demo_data.write_demo_set(str(root / "data"), painters=3, per_painter=24, size=64)
    first = sorted((root / "data").iterdir())[0]
    for name in ("truncated.jpg", "zero_byte.jpg"):
        (first / name).write_bytes(bad_files()[name])
    out = str(root / "catalog")
    cat = catalog.build(CatalogConfig(source=str(root / "data"), split=(0.6, 0.2, 0.2), seed=1))
    catalog.write(cat, out, CatalogConfig(source=str(root / "data")))
    return out


# What makes the tiny backbone really learn the small catalog's painters: validation reaches 1.0 by epoch ~10 of 14
# and test 1.0 (with 6 head epochs it sat at the 0.9 line: 0.75 and 0.92 in two runs of the same code).
LEARNABLE = {"data__image_size": "64", "train__lr": "0.9", "train__batch_size": "4", "train__head_epochs": "12",
             "train__finetune_epochs": "2"}


def tiny_job(catalog_dir, workdir, name, **sets):
    """A job that trains the tiny backbone on 32-px images in seconds; `section__field=value` overrides."""
    from artnet import presets
    from artnet.config import override

    base = {"catalog": catalog_dir, "workdir": str(workdir), "name": name, "data.image_size": "32",
            "train.head_epochs": "2", "train.finetune_epochs": "1", "train.batch_size": "8", "train.patience": "0",
            "data.decode_batch": "16"}
    return override(presets.preset("demo"), {**base, **{k.replace("__", "."): str(v) for k, v in sets.items()}})


@pytest.fixture(autouse=True)
def restore_mlflow_env():
    """`mlflow.set_tracking_uri` (called by artnet's model loading and by Tune's MLflow callback) also sets
    MLFLOW_TRACKING_URI, which artnet honours: keep tests apart."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 HTTP endpoint on loopback; the AWS environment points every client (pyarrow, boto3, Ray
    workers, MLflow) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1", "MLFLOW_S3_ENDPOINT_URL": endpoint}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint):
    from artnet.data import storage

    client = storage.boto3_client()
    client.create_bucket(Bucket="paintings")
    return "paintings"


@pytest.fixture(scope="session")
def ray_local(s3_endpoint):
    """One real local Ray cluster for the session. Started after the S3 environment is set, so its workers
    inherit the credentials like a cluster's nodes would have them. Logical CPUs leave headroom on 2 cores."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def no_placement_group_outlives_its_test():
    """Frees what Ray Train's PlacementGroupCleaner frees on a real cluster. When Tune ends a fine-tuning trial,
    its Train controller dies with it, and the cleaner that would then remove the workers' placement group
    watches controllers through the dashboard's state API, which this test cluster does not run. Left there,
    the group would hold its CPUs for good, and a later test's workers would wait for them forever."""
    yield
    import ray

    if not ray.is_initialized():
        return
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    for group_id, group in ray.util.placement_group_table().items():
        if group["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(root: Path, port: int, artifacts: str = "", *options: str, env: dict | None = None):
    """A real `mlflow server` on loopback port `port` (sqlite under `root`; artifacts proxied to `artifacts`,
    e.g. an s3:// prefix, default under `root`), once it answers; started again on the same `root` and port, it
    serves the same runs. `options` and `env`: more of its own (e.g. `--app-name basic-auth` and its config)."""
    import subprocess
    import sys
    import time

    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", *options, "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", artifacts or str(root / "artifacts")],
        env={**os.environ, **(env or {})}, stdout=open(root / "server.log", "ab"), stderr=subprocess.STDOUT,
        start_new_session=True)
    deadline = time.time() + 120
    while not mlflow_answers(port):
        if server.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return server


def mlflow_answers(port: int) -> bool:
    """Whether an MLflow server on loopback `port` answers its health check."""
    import urllib.request

    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on loopback (sqlite behind it, artifacts proxied over HTTP): what a cluster's
    nodes share instead of one machine's sqlite file."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=30)
