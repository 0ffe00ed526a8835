"""`model.compile` in every stage (ldm/training/compile.py): the CLIP, VAE and latent-diffusion stages compile their
parts in place and train as they do eagerly (real Trainer, real shards). On the CPU the compiled runs use AOTAutograd's
`aot_eager` backend: the same tracing as the `cudagraphs` backend, whose graphs a GPU then replays; the cudagraphs
backend itself leaves a CPU run eager, and says so."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters
from tiny import TINY_OPEN_CLIP, compose_config, make_tiny_root

from ldm.models.clip import build_open_clip
from ldm.models.vae import build_vae
from ldm.run.fit import train
from ldm.stages.autoencoder import AutoencoderModule
from ldm.stages.clip import CLIPModule
from ldm.training.compile import compile_in_place, compile_options

VAE_TINY = ["data.resolution=16", "data.batch_size=4", "data.shuffle_buffer=8", "model.vae.block_out_channels=[8,16]",
            "model.vae.norm_num_groups=4", "model.vae.sample_size=16", "callbacks.reconstructions=null"]
CLIP_TINY = ["data.resolution=16", "data.batch_size=8", "data.shuffle_buffer=8", "model.clip.embed_dim=16",
             "model.clip.vision_cfg.patch_size=8", "model.clip.vision_cfg.width=32", "model.clip.vision_cfg.layers=1",
             "model.clip.text_cfg.width=32", "model.clip.text_cfg.heads=2", "model.clip.text_cfg.layers=2"]
COMMON = ["logger=none", "trainer.accelerator=cpu", "trainer.max_steps=3", "trainer.enable_progress_bar=false",
          "trainer.enable_model_summary=false", "optim.warmup_steps=1", "callbacks.val_loss=null", "seed=3"]
STAGES = {  # experiment, overrides, the config key its export goes to
    "clip": ("shapes_clip", CLIP_TINY, "paths.clip_dir"),
    "vae": ("shapes_vae", VAE_TINY, "paths.vae_dir"),
    "ldm": ("shapes", ["callbacks.fid=null", "callbacks.export=null", "model.ema_decay=null"], None),
}


def compiled(module: torch.nn.Module) -> bool:
    return module._compiled_call_impl is not None  # what nn.Module.compile sets


def test_compile_options_follow_model_compile():
    assert compile_options(False) is None and compile_options(None) is None
    assert compile_options(True) == {}
    assert compile_options({"backend": "cudagraphs", "dynamic": False}) == {"backend": "cudagraphs", "dynamic": False}
    assert compile_options({"backend": "inductor"}) == {"backend": "inductor"}


def test_the_cudagraphs_backend_compiles_each_shape_statically():
    """CUDA graphs replay fixed shapes: `{backend: cudagraphs}` gets dynamic=False (one static graph per batch size; a
    graph made dynamic at the second shape failed at a third on an H200), and an explicit `dynamic` is kept."""
    options = compile_options({"backend": "cudagraphs"})
    assert options == {"backend": "cudagraphs", "dynamic": False}
    assert compile_options({"backend": "cudagraphs", "dynamic": True})["dynamic"] is True
    from torch._dynamo.testing import CompileCounter

    graphs = {}
    for dynamic in (options["dynamic"], None):  # what the option gives, against torch.compile's default
        torch._dynamo.reset()
        counter = CompileCounter()
        module = torch.compile(torch.nn.Linear(3, 2), backend=counter, dynamic=dynamic)
        for batch in (8, 5, 3, 8):
            module(torch.randn(batch, 3))
        graphs[dynamic] = counter.frame_count
    torch._dynamo.reset()
    assert graphs == {False: 3, None: 2}  # static: a graph per batch size; default: the second shape goes dynamic


def test_the_cudagraphs_backend_leaves_a_cpu_run_eager(caplog):
    parts = [torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)]
    with caplog.at_level("INFO"):
        assert compile_in_place(parts, {"backend": "cudagraphs"}, "cpu") is False
    assert not any(compiled(p) for p in parts)
    assert "the cudagraphs backend needs a CUDA device" in caplog.text
    assert compile_in_place(parts, {"backend": "aot_eager"}, "cpu") is True
    assert all(compiled(p) for p in parts)
    assert compile_in_place(parts[:1], None, "cuda") is False


def test_each_stage_compiles_its_parts_once():
    vae = AutoencoderModule(build_vae(block_out_channels=[8, 16], norm_num_groups=4, sample_size=16),
                            compile={"backend": "aot_eager"})  # fmt: skip
    vae.configure_model()
    assert compiled(vae.vae.encoder) and compiled(vae.vae.decoder) and not compiled(vae.vae)
    clip = CLIPModule(build_open_clip(**TINY_OPEN_CLIP), compile=True)
    clip.configure_model()
    assert compiled(clip.model.visual) and compiled(clip.model.transformer)
    inner = clip.model.visual._compiled_call_impl
    clip.configure_model()  # Lightning may call it again (a resumed fit): nothing is compiled twice
    assert clip.model.visual._compiled_call_impl is inner
    eager = CLIPModule(build_open_clip(**TINY_OPEN_CLIP))
    eager.configure_model()
    assert not compiled(eager.model.visual)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_compiled_stage_trains_as_the_eager_one(stage, tmp_path):
    root = make_tiny_root(tmp_path / "root")
    experiment, overrides, export_key = STAGES[stage]
    losses, graphs = {}, {}
    for name, compile_ in (("eager", "false"), ("compiled", "{backend:aot_eager}")):
        extra = [f"{export_key}={tmp_path / name / 'export'}"] if export_key else []
        cfg = compose_config(root, tmp_path / name, [*COMMON, *overrides, *extra, f"model.compile={compile_}"],
                             experiment=experiment, tiny=stage == "ldm")  # fmt: skip
        counters.clear()
        losses[name] = train(cfg)["train/loss"]
        graphs[name] = counters["stats"]["unique_graphs"]  # graphs dynamo traced in this run
    assert graphs["eager"] == 0 and graphs["compiled"] >= 2  # every compiled part traced
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4)


@pytest.mark.parametrize("stage", ["clip", "vae"])
def test_a_compiled_stage_validates_eagerly(stage, tmp_path):
    """Validation runs a few batches of new shapes without gradients: a compiled stage runs them eagerly (no graph
    traced for them; ldm.training.compile.eager_stance) and trains compiled again after, the stance back to default.
    The VAE's rFID evaluation (at step 2 and at the end) runs eagerly too."""
    root = make_tiny_root(tmp_path / "root")
    experiment, overrides, export_key = STAGES[stage]
    rfid = ["callbacks.reconstructions.num_images=8", "callbacks.reconstructions.batch_size=4",
            "callbacks.reconstructions.grid_images=4", "callbacks.reconstructions.every_n_steps=2"]
    evaluated = [o for o in overrides if o != "callbacks.reconstructions=null"] + (rfid if stage == "vae" else [])
    graphs = {}
    for name, validate in (("no_validation", [*overrides, "++trainer.limit_val_batches=0"]),
                           ("validation", [*evaluated, "++trainer.val_check_interval=2", "++trainer.limit_val_batches=2"])):  # fmt: skip
        cfg = compose_config(root, tmp_path / name, [*COMMON, f"{export_key}={tmp_path / name / 'export'}",
                                                     "model.compile={backend:aot_eager}", "trainer.max_steps=4",
                                                     "++trainer.check_val_every_n_epoch=null", *validate],
                             experiment=experiment, tiny=False)  # fmt: skip
        torch._dynamo.reset()  # each run compiles afresh (code compiled in one run serves the next)
        counters.clear()
        train(cfg)
        graphs[name] = counters["stats"]["unique_graphs"]
        assert torch._dynamo.eval_frame._stance.stance == "default"
    assert graphs["validation"] == graphs["no_validation"] >= 2


def test_the_static_parameter_backend_runs_where_torch_skips_graphs():
    """On the CPU torch's cudagraphs backend captures nothing (it skips graphs for CPU tensors); the static-parameter
    variant then gives eager results too: its hooks into torch's internals exist in this torch version."""
    from torch._inductor import cudagraph_trees

    from ldm.training.compile import cudagraphs_static_parameters

    stock = cudagraph_trees.cudagraphify_impl
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 2))
    x = torch.randn(3, 4)
    expected = model(x)
    compiled_model = torch.compile(model, backend=cudagraphs_static_parameters, dynamic=False)
    torch.testing.assert_close(compiled_model(x), expected)
    compiled_model(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert cudagraph_trees.cudagraphify_impl is stock  # torch's own function again once the graph is compiled


def _dtod_copies(step) -> int:
    """Device-to-device copies one call of ``step`` makes (a CUDA graph's input copies are such copies)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if "Memcpy DtoD" in e.name)


@pytest.mark.gpu
def test_cudagraphs_replays_read_the_parameters_in_place():
    """The cudagraphs backend as compile_in_place uses it trains as eager code does, and a replay copies none of the
    parameters (the stock backend copied every one of the U-Net's into the graph's memory before each replay)."""

    class Conv(torch.nn.Module):  # a module of its own, as diffusers' are: dynamo treats torch's built-in modules'
        def __init__(self, c_in, c_out):  # parameters as static already (session 24, torch 2.11: no copies for those)
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(c_out, c_in, 3, 3) / (3 * c_in**0.5))
            self.bias = torch.nn.Parameter(torch.zeros(c_out))

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.weight, self.bias, padding=1)

    def make():
        torch.manual_seed(0)
        layers = [Conv(4, 16), torch.nn.SiLU()] + [m for _ in range(8) for m in (Conv(16, 16), torch.nn.SiLU())]
        return torch.nn.Sequential(*layers, Conv(16, 4)).cuda()

    x = torch.randn(8, 4, 16, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(1))

    def trainer(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

        def step():
            loss = model(x).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            return loss.detach()

        return step

    eager, graphed, stock = make(), make(), make()
    assert compile_in_place([graphed], compile_options({"backend": "cudagraphs"}), "cuda")
    stock.compile(backend="cudagraphs", dynamic=False)
    steps = {name: trainer(m) for name, m in (("eager", eager), ("graphed", graphed), ("stock", stock))}
    losses = {name: [float(step()) for _ in range(6)] for name, step in steps.items()}
    n_params = len(list(graphed.parameters()))
    copies = {name: _dtod_copies(steps[name]) for name in ("stock", "graphed")}
    print(f"losses {losses}; parameters {n_params}; device-to-device copies a step {copies}")
    assert len(set(losses["eager"])) == len(losses["eager"])  # the weights move: a graph reading stale ones would lag
    # eager and graphed runs differ only by the GPU's order of summation (cuDNN's weight gradients)
    assert losses["graphed"] == pytest.approx(losses["eager"], rel=1e-3)
    # the input batch and the gradients' seeds, not the weights (torch 2.11's own backend copied none either in this
    # model, on one H200 in session 24; in session 23's stage-2 profile of the real U-Net it copied ~300 a step)
    assert copies["graphed"] < n_params


def test_the_bench_counts_recompilations_and_graph_breaks_in_a_real_log():
    """scripts/bench_train.py reads both from the run's TORCH_LOGS output: a function that breaks its graph and
    meets a second shape, and one that does neither, each compiled in a process of its own. A break counts once per
    compilation that meets it."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "scripts" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    code = (
        "import torch\n"
        "@torch.compile(backend='eager')\n"
        "def f(x):\n"
        "    y = x * 2\n"
        "    if BREAK:\n"
        "        torch._dynamo.graph_break()\n"
        "    return y + 1\n"
        "f(torch.randn(3)); f(torch.randn(3)); f(torch.randn(4, 2) if BREAK else torch.randn(3))\n"
    )
    env = {**os.environ, "TORCH_LOGS": "recompiles,graph_breaks"}
    logs = {flag: subprocess.run([sys.executable, "-c", f"BREAK = {flag}\n" + code], capture_output=True, text=True,
                                 env=env, check=True).stderr
            for flag in (True, False)}  # fmt: skip
    broken = bench.compile_events(logs[True])
    assert broken["recompiles"] >= 1
    assert broken["graph_breaks"] == 2  # one break, logged again when f is compiled for the second shape
    assert bench.compile_events(logs[False]) == {"recompiles": 0, "graph_breaks": 0}
