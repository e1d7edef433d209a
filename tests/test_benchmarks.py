"""The benchmark harness (benchmarks/run.py, flops.py, torch_models.py): one tiny config end to
end with its documented fields, the MFU table, the RESULTS.md section writer, and the PyTorch
baselines' parameter counts against spectrax's (no timing is asserted: this machine is shared)."""
from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

# benchmarks/ is a top-level package of the repository, not of the installed spectrax.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import flops as F  # noqa: E402
from benchmarks import run  # noqa: E402


@pytest.fixture(scope="module")
def row(tmp_path_factory):
    """tokenizer 'tiny' (the fastest to compile), 2 steps, 1 repetition, batch 4; no breakdown
    (two more compilations) and no PyTorch (torch.compile alone takes ~1 min here)."""
    cache = tmp_path_factory.getbasetemp().parent / "spectrax-bench-data"
    return run.bench_config("tokenizer_tiny", steps=2, reps=1, batch=4, threads=(1,),
                            pipeline_batches=2, n_train=64, cache_dir=str(cache),
                            breakdown=False, log=lambda *a: None)


def test_harness_returns_documented_fields(row):
    missing = [k for k in run.RESULT_FIELDS if k not in row]
    assert not missing, missing
    assert row["config"] == "tokenizer_tiny" and row["batch"] == 4 and row["steps"] == 2
    # Tokens of the tokenizer are 32-pixel patches of the (longest-bucket) batch.
    assert row["tokens_per_spectrum"] == math.ceil(row["pixels"] / 32)
    assert row["step_ms"] > 0 and row["compile_s"] > 0
    assert row["train_spectra_per_s"] == pytest.approx(4 / (row["step_ms"] / 1e3), rel=0.02)
    assert row["train_tokens_per_s"] == pytest.approx(
        row["train_spectra_per_s"] * row["tokens_per_spectrum"], rel=0.02)
    assert row["predict_spectra_per_s"] > 0
    assert row["flops_per_step"] > 0 and row["achieved_flops_per_s"] > 0
    assert row["peak_bytes"] > 0
    assert set(row["pipeline_spectra_per_s"]) == {"1"}
    assert row["bottleneck"] in ("pipeline", "step")
    assert row["fwd_ms"] is None and row["bwd_ms"] is None  # breakdown off
    assert row["params"] == 20_352
    assert len(row["loadavg_start"]) == 3


def test_mfu_is_none_on_cpu(row):
    if row["platform"] != "cpu":
        pytest.skip("runs on an accelerator")
    assert row["mfu"] is None and row["peak_flops_per_s"] is None


def test_peak_table_and_mfu():
    assert F.device_peak_flops("cpu") is None
    assert F.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert F.device_peak_flops("NVIDIA H200") == 989e12
    assert F.device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
    assert F.device_peak_flops("TPU v4") == 275e12
    assert F.device_peak_flops("TPU v5 lite") == 197e12
    assert F.device_peak_flops("TPU v5") == 459e12
    assert F.mfu(989e12 * 0.25, 1.0, "NVIDIA H100 80GB HBM3") == pytest.approx(0.25)
    assert F.mfu(1e12, 1.0, "cpu") is None
    assert F.mfu(None, 1.0, "TPU v4") is None


def test_results_md_section_replaced_not_duplicated(row, tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# Throughput results\n\nearlier text\n")
    section = run.markdown([row], "python -m benchmarks.run --configs=tokenizer_tiny")
    assert "| tokenizer_tiny | 4 × " in section and "n/a" in section  # MFU on CPU
    run.update_results_md(md, section, "2026-01-01 host")
    run.update_results_md(md, section.replace("tokenizer_tiny |", "again |"), "2026-01-01 host")
    run.update_results_md(md, section, "2026-01-02 host")
    text = md.read_text()
    assert text.startswith("# Throughput results\n\nearlier text\n")
    assert text.count("<!-- benchmarks.run 2026-01-01 host -->") == 1
    assert "| again |" in text and text.count("<!-- /benchmarks.run -->") == 2


# ----------------------------------------------------------------------------------------------
# PyTorch baselines
# ----------------------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from benchmarks import torch_models as T  # noqa: E402


def _model_cfg(name, variant, num_outputs=0):
    import ml_collections
    return ml_collections.ConfigDict(dict(name=name, variant=variant, dtype="float32",
                                          num_outputs=num_outputs))


@pytest.mark.parametrize("name,variant,expected", [
    ("specpt_autoencoder", "small", 63_308_485),
    ("specpt_autoencoder", "tokens", 126_496),
    ("tokenizer", "small", 806_048),
    ("spectrafm", "small", 255_746),
    ("vit", "tiny", 1_521_219),               # Hugging Face ViTModel + linear head, K = 3
    ("vit", "b16", 85_800_963),
    ("transformer1d", "small", 605_441),
    ("transformer1d", "paper", 19_047_937),
])
def test_torch_parameter_counts_equal_spectrax(name, variant, expected):
    cfg = _model_cfg(name, variant, 3 if name == "vit" else 1)
    with torch.device("meta"):  # counts shapes, allocates nothing (SpecPT small: 63 M)
        module, _ = T.build(cfg)
    assert T.check_parameter_count(module, cfg) == expected


def _random_batch(length=300, batch=3, labels=0, seed=0, wavelength=(3600.0, 9800.0)):
    rng = np.random.default_rng(seed)
    mask = rng.random((batch, length)) > 0.1
    return {"flux": torch.tensor(rng.uniform(0.2, 1.1, (batch, length)), dtype=torch.float32),
            "ivar": torch.tensor(rng.uniform(1, 4, (batch, length)), dtype=torch.float32),
            "wavelength": torch.tensor(np.tile(np.linspace(*wavelength, length), (batch, 1)),
                                       dtype=torch.float32),
            "mask": torch.tensor(mask), "labels": torch.tensor(
                rng.normal(size=(batch, labels)), dtype=torch.float32),
            "label_mask": torch.ones(batch, labels, dtype=torch.bool),
            "valid": torch.ones(batch, dtype=torch.bool)}


@pytest.mark.parametrize("name", ["specpt_autoencoder", "tokenizer"])
def test_torch_baselines_train_one_step(name):
    """Forward, backward and an AdamW step give a finite loss (tiny widths, short spectra)."""
    torch.manual_seed(0)
    module, loss_fn = T.build(_model_cfg(name, "tiny"))
    step = T.TorchTrainStep(module, loss_fn, lr=1e-3, weight_decay=0.0, clip_norm=1.0)
    assert torch.isfinite(step(_random_batch()))


def test_torch_spectrafm_train_one_step():
    from spectrax.models import spectrafm
    length, labels = 40, spectrafm.LABEL_NAMES
    task = SimpleNamespace(
        stats={"pixel_median": [0.6] * length, "pixel_mad": [0.3] * length,
               "label_median": {n: 0.0 for n in labels}, "label_mad": {n: 1.0 for n in labels}},
        labels=labels, has_errors=True, pixel_range=(0, 0), context=None)
    torch.manual_seed(0)
    module, loss_fn = T.build(_model_cfg("spectrafm", "tiny"), task)
    step = T.TorchTrainStep(module, loss_fn, lr=1e-3, weight_decay=0.0, clip_norm=1.0)
    batch = _random_batch(length, labels=2 * len(labels), wavelength=(15100.0, 16900.0))
    batch["labels"][:, len(labels):] = 0.1  # label errors
    assert torch.isfinite(step(batch))


def test_torch_vit_and_transformer1d_train_one_step():
    """The ViT (on images in [0, 1]) and the 1D transformer (regression, standardised labels)
    give a finite loss through forward, backward and AdamW."""
    torch.manual_seed(0)
    module, loss_fn = T.build(_model_cfg("vit", "tiny", 3))
    step = T.TorchTrainStep(module, loss_fn, lr=1e-3, weight_decay=0.0, clip_norm=1.0)
    batch = _random_batch(labels=1)
    batch["labels"][:, 0] = torch.tensor([0.0, 2.0, 1.0])
    batch["images"] = torch.rand(3, 224, 224, 3)
    assert torch.isfinite(step(batch))
    task = SimpleNamespace(mean=[0.5], std=[0.2])
    module, loss_fn = T.build(_model_cfg("transformer1d", "tiny", 1), task)
    step = T.TorchTrainStep(module, loss_fn, lr=1e-3, weight_decay=0.0, clip_norm=1.0)
    assert torch.isfinite(step(_random_batch(length=100, labels=1)))


# ----------------------------------------------------------------------------------------------
# The GPU script (benchmarks/gpu.sh): its plan on paper-size configs, and a smoke run on CPU
# ----------------------------------------------------------------------------------------------
def test_gpu_plan_builds_every_paper_config_with_cudnn_eligible_attention():
    """Every config of the GPU plan exists, builds (abstractly) in bf16 with cuDNN attention,
    and every attention layer's head dimension is one cuDNN's flash kernel takes, so the 'cudnn'
    rows measure the fused kernel."""
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import gpu
    from spectrax.models import registry
    from spectrax.nn import MultiHeadAttention
    from spectrax.nn.attention import choose_implementation

    for name, batch, attentions in gpu.PLAN:
        config = run.CONFIGS[name].make()
        with config.unlocked():
            config.model.dtype, config.model.attention = "bfloat16", attentions[0]
        model = nnx.eval_shape(lambda: registry.build_model(config.model, rngs=nnx.Rngs(0)))
        layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, MultiHeadAttention)]
        assert layers and {m.implementation for m in layers} == {attentions[0]}, name
        if "cudnn" in attentions:
            for m in layers:
                shape = (batch, 10, m.num_heads, m.head_dim)
                assert choose_implementation(shape, shape, jnp.bfloat16, "gpu") == "cudnn", name
    assert [e["config"] for e in gpu.plan(False, ("vit",))] == ["vit_b16", "vit_b16"]


def test_gpu_script_smoke_on_cpu(tmp_path):
    """benchmarks/gpu.sh --smoke: the driver, a child process per entry, bf16 tiny configs with
    two attention implementations, the JSON rows and the RESULTS.md section."""
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    out, md = tmp_path / "rows.jsonl", tmp_path / "RESULTS.md"
    res = subprocess.run([str(repo / "benchmarks" / "gpu.sh"), "--smoke", "--only=tokenizer",
                          f"--out={out}", f"--results_md={md}"], cwd=repo, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    import json
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["config"], r["attention_requested"], r["status"]) for r in rows] == [
        ("tokenizer_tiny", "blocked", "ok"), ("tokenizer_tiny", "xla", "ok")]
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["attention"] == r["attention_requested"]
        assert r["step_ms"] > 0 and r["predict_spectra_per_s"] > 0 and r["peak_bytes"] > 0
        assert r["smoke"] is True and r["gpu_run"] == rows[0]["gpu_run"]
    text = md.read_text()
    assert "| tokenizer_tiny | 2 | blocked |" in text and "speed-up per model" in text


# ----------------------------------------------------------------------------------------------
# The profile summariser (benchmarks/profile.py)
# ----------------------------------------------------------------------------------------------
def test_profile_names_ops_from_the_hlo_and_sums_trace_events():
    """Ops are named from the optimised HLO (opcode, fusion contents, forward/backward/optimiser
    from the name stack); control-flow events, which enclose their bodies' events, and runtime
    events are not counted."""
    import jax
    import jax.numpy as jnp

    from benchmarks import profile

    def f(w, x):
        loss = lambda w: jnp.sum(jnp.exp(x @ w))  # noqa: E731
        g = jax.grad(loss)(w)
        with jax.named_scope("optimizer_step"):
            w = jax.lax.fori_loop(0, 3, lambda i, w: w - 0.1 * g * i, w)
        return w

    args = (jnp.ones((8, 8)), jnp.ones((4, 8)))
    hlo = profile.parse_hlo(jax.jit(f).lower(*args).compile().as_text())
    kinds = {name: profile.op_kind(info) for name, info in hlo.items()}
    loops = [n for n, i in hlo.items() if i["opcode"] == "while"]
    assert loops and any("exponential" in k for k in kinds.values())
    fusion = next(n for n, k in kinds.items() if "exponential" in k)
    events = [{"name": fusion, "ts": 0.0, "dur": 3000.0},
              {"name": fusion, "ts": 5000.0, "dur": 1000.0},
              {"name": loops[0], "ts": 0.0, "dur": 9000.0},
              {"name": "PjitFunction(f)", "ts": 0.0, "dur": 9e6}]
    s = profile.summarise(events, hlo, steps=2, top=5)
    assert s["ops_ms"] == 2.0 and s["top_ops"][0]["op"] == fusion
    # 2 ms between the two op events (the loop's and the runtime's spans do not fill gaps).
    assert s["untraced_ms"] == 1.0 and s["longest_gaps"][0]["ms"] == 1.0   # per step
    assert s["top_ops"][0]["part"] in ("forward", "backward")
    assert any(profile.op_part(hlo[n]) == "optimizer" for n in hlo
               if hlo[n]["opcode"] in ("fusion", "multiply", "subtract"))


def test_optimizer_bound_counts_bytes_of_trained_parameters():
    from benchmarks import profile

    trainer = SimpleNamespace(
        abstract_state={"params": {"a": np.zeros((10, 10)), "b": np.zeros(5)}},
        optimizer=SimpleNamespace(frozen={"a": "train", "b": "frozen"}))
    bound = profile.optimizer_bound(trainer, bandwidth=1e9)
    # norm: 105 gradients read; update: 100 trained x (4 reads + 3 writes); 4 bytes each.
    assert bound["bytes"] == 4 * 105 + 7 * 4 * 100
    assert bound["bound_ms"] == pytest.approx(bound["bytes"] / 1e9 * 1e3, abs=0.1)
