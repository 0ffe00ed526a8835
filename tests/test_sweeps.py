"""Sweeps through the real CLI (`python -m ldm.train -m ...` in a subprocess) on tiny real components: DDP jobs
with 2 gloo ranks each, W&B offline runs grouped by sweep, the job index, a job failing on purpose, an Optuna
search over parallel joblib jobs that minimises val/fid, and the report; plus the pieces they rest on."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from tiny import CONF, TINY, TINY_UNET, make_tiny_root, saved_config
from wandb_offline import config, history, run_files, run_info

from ldm.callbacks.metrics_log import read_metrics
from ldm.report import main as report_main
from ldm.run.launch import ranks_to_launch
from ldm.sweeps.job import objective_value
from ldm.training.checkpoint import load_checkpoint
from ldm.utils.sweep_index import job_params, run_name, swept_keys


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    return make_tiny_root(tmp_path_factory.mktemp("tiny"))


def ldm_train(cwd, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, "-m", "ldm.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=900)


def tiny_args(root) -> list[str]:
    return ["experiment=shapes", f"paths.data_dir={root}", *TINY, *TINY_UNET, "callbacks.export=null"]


def _job_dirs(sweep):
    return sorted(p.name for p in sweep.iterdir() if p.is_dir())


# --- through the CLI ------------------------------------------------------------------------------------
def test_ddp_sweep_gives_one_run_per_job_and_marks_the_failed_one(tiny_root, tmp_path):
    """2 jobs x 2 gloo ranks; the first job fails at train time (AdamW refuses eps=-1, a key added with `+` that the
    config checks leave to AdamW), the second still runs
    and returns its FID (measured at step 2 of 3) as the objective."""
    sweep = tmp_path / "lr_sweep"
    out = ldm_train(tmp_path, "-m", *tiny_args(tiny_root), "logger=wandb", "trainer.max_steps=3",
                    "callbacks.fid.every_n_steps=2", "callbacks.fid.at_end=false", "callbacks.val_loss.at_end=false",
                    "objective.metric=val/fid", "trainer.devices=2", "trainer.strategy=ddp",
                    "+optim.optimizer.eps=-1,1e-8", f"hydra.sweep.dir={sweep}")
    assert out.returncode == 0, out.stderr[-4000:]
    log = out.stdout + out.stderr
    assert log.count("Launching 2 jobs") == 1  # the sweep ran once: no rank relaunched it
    assert _job_dirs(sweep) == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_sweep"]  # no stray run directories

    index = json.loads((sweep / "index.json").read_text())
    assert index["params"] == ["optim.optimizer.eps"]
    failed, done = index["jobs"]
    assert (failed["num"], failed["status"], failed["params"]) == (0, "failed", {"optim.optimizer.eps": -1.0})
    assert "Invalid epsilon value" in failed["error"] and failed["error"].startswith("RanksFailed: rank ")
    assert (done["num"], done["status"], done["params"]) == (1, "completed", {"optim.optimizer.eps": 1e-8})
    assert done["metrics"]["train/images_seen"] == 2 * 4 * 3  # 2 ranks x batch 4 x 3 steps: both ranks trained
    assert (sweep / "0" / "error.txt").is_file() and "objective" not in failed

    # the FID callback's own record of its evaluation, the metrics log and the objective agree
    (evaluation,) = json.loads((sweep / "1" / "fid" / "history.json").read_text())
    rows = read_metrics(sweep / "1" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3]  # every step (trainer.log_every_n_steps=1), rank 0 only
    assert ["val/fid" in row for row in rows] == [False, True, False]  # at the step it was measured, once
    assert rows[1]["val/fid"] == pytest.approx(evaluation["val/fid"]) == done["objective"]

    runs = {f.relative_to(sweep).parts[0]: f for f in run_files(sweep)}
    assert sorted(runs) == ["0", "1"]  # one W&B run per job, in the job's own directory (rank 0 only)
    for job, name in zip(index["jobs"], ["shapes-0 optim.optimizer.eps=-1", "shapes-1 optim.optimizer.eps=1e-08"]):
        run = runs[job["dir"]]
        info = run_info(run)
        assert info["group"] == index["group"] == f"shapes-{sweep.name}"
        assert info["name"] == job["name"] == name
        logged = config(run)
        assert logged["optim"]["optimizer"]["eps"] == job["params"]["optim.optimizer.eps"]
        assert logged["sweep"] == {"group": index["group"], "job": job["num"], "params": job["params"]}
        assert logged["trainer"]["devices"] == 2
    assert max(row.get("train/images_seen", 0) for row in history(runs["1"])) == 24

    # the job saved the config it trained with: nothing was added to it after Hydra wrote .hydra/config.yaml
    trained = load_checkpoint(sweep / "1" / "checkpoints" / "last.ckpt")["config"]
    assert saved_config(sweep / "1") == trained
    assert trained["logger"]["name"] == "shapes-1 optim.optimizer.eps=1e-08" and trained["logger"]["group"] == index["group"]

    report_main([str(sweep)])
    lines = (sweep / "report.md").read_text().splitlines()
    assert lines[0].startswith("| job | status | optim.optimizer.eps | val/fid best | val/fid final |")
    assert lines[2].startswith("| 0 | failed | -1 |  |  |") and "Invalid epsilon value" in lines[2]
    fid = f"{done['objective']:.4g}"
    assert lines[3].startswith(f"| 1 | completed | 1e-08 | {fid} | {fid} |")
    with Image.open(sweep / "fid_curves.png") as png:
        assert png.size == (700, 450)


@pytest.mark.slow  # three processes that import everything, four FID evaluations: ~2 min on 2 cores
def test_optuna_search_over_parallel_jobs_minimises_best_fid(tiny_root, tmp_path):
    """hparams_search=fid_optuna: 2 trials in one batch run by 2 joblib workers; the value each job returns is
    the best val/fid its FID callback recorded, and the sweeper's best is the smallest of them."""
    sweep = tmp_path / "search"
    out = ldm_train(tmp_path, "hparams_search=fid_optuna", *tiny_args(tiny_root), "logger=csv",
                    "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
                    "hydra.launcher.n_jobs=2", "diffusion.cfg_dropout=0.1", "sampling.guidance_scale=5",
                    "callbacks.fid.every_n_steps=1", f"hydra.sweep.dir={sweep}")  # FID at steps 1 and 2
    assert out.returncode == 0, out.stderr[-4000:]
    assert _job_dirs(sweep) == ["0", "1"]
    index = json.loads((sweep / "index.json").read_text())
    assert index["params"] == ["optim.lr"]  # the keys fixed on the command line are not searched
    jobs = index["jobs"]
    assert [job["status"] for job in jobs] == ["completed", "completed"]
    lrs = [job["params"]["optim.lr"] for job in jobs]
    assert lrs[0] != lrs[1] and all(1e-5 <= lr <= 1e-3 for lr in lrs)
    assert jobs[0]["started"] < jobs[1]["finished"] and jobs[1]["started"] < jobs[0]["finished"]  # in parallel

    for job in jobs:  # against the FID callback's own record of its evaluations
        evaluations = json.loads((sweep / job["dir"] / "fid" / "history.json").read_text())
        assert [row["step"] for row in evaluations] == [1, 2]
        logged = [row for row in read_metrics(sweep / job["dir"] / "metrics.jsonl") if "val/fid" in row]
        assert [row["step"] for row in logged] == [1, 2]  # each FID once, at the step it was measured
        assert [row["val/fid"] for row in logged] == pytest.approx([row["val/fid"] for row in evaluations])
        assert job["objective"] == pytest.approx(min(row["val/fid"] for row in evaluations), rel=1e-6)
        assert OmegaConf.load(sweep / job["dir"] / ".hydra" / "config.yaml").optim.lr == job["params"]["optim.lr"]
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = min(jobs, key=lambda job: job["objective"])
    assert result["best_value"] == pytest.approx(best["objective"])
    assert result["best_params"] == best["params"]

    # the sweep wrote its report when it ended
    rows = {int(r["job"]): r for r in _csv_rows(sweep / "report.csv")}
    for job in jobs:
        assert float(rows[job["num"]]["val/fid best"]) == pytest.approx(job["objective"])
        assert float(rows[job["num"]]["optim.lr"]) == job["params"]["optim.lr"]
    with Image.open(sweep / "fid_curves.png") as png:
        assert png.size == (700, 450)


def _csv_rows(path):
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_report_refuses_a_directory_that_is_not_a_sweep(tmp_path, capsys):
    from ldm.utils.cli import run_command

    with pytest.raises(FileNotFoundError, match="not a sweep directory: no index.json"):
        report_main([str(tmp_path)])
    assert run_command(report_main, [str(tmp_path)]) == 1  # what `python -m ldm.report DIR` does with it
    assert capsys.readouterr().err == f"error: {tmp_path} is not a sweep directory: no index.json\n"
    with pytest.raises(FileNotFoundError):
        report_main([str(tmp_path / "absent")])
    assert not (tmp_path / "absent").exists()  # nothing made for a mistaken path


# --- the pieces -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer, expected", [
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp"}, 2),
    ({"accelerator": "cpu", "devices": 3, "strategy": "auto"}, 3),  # Lightning would pick ddp
    ({"accelerator": "cpu", "devices": 1, "strategy": "ddp"}, 0),
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"}, 0),  # ranks start from the process
    ({"accelerator": "cpu", "devices": 2, "strategy": "ddp_fork_find_unused_parameters_true"}, 0),
])
def test_ranks_to_launch(trainer, expected, monkeypatch):
    for var in ("LOCAL_RANK", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "LSB_JOBID"):
        monkeypatch.delenv(var, raising=False)
    assert ranks_to_launch(OmegaConf.create(trainer)) == expected


@pytest.mark.parametrize("env", [{"LOCAL_RANK": "0"},  # a launcher of one's own
                                 {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "train"}])  # SLURM tasks are the ranks
def test_no_ranks_launched_where_processes_exist(env, monkeypatch):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert ranks_to_launch(OmegaConf.create({"accelerator": "cpu", "devices": 2, "strategy": "ddp"})) == 0


def test_swept_keys_and_job_params():
    keys = swept_keys(["optim.lr=1e-4,3e-4", "trainer.max_steps=2", "model/unet=tiny",
                       "+diffusion.min_snr_gamma=choice(1,5)", "sampling.guidance_scale=5"],
                      {"diffusion.cfg_dropout": "choice(0.05, 0.1)", "sampling.guidance_scale": "interval(2, 8)"})
    assert keys == ["optim.lr", "diffusion.min_snr_gamma", "diffusion.cfg_dropout"]
    params = job_params(["optim.lr=0.0003", "trainer.max_steps=2", "+diffusion.min_snr_gamma=5",
                         "diffusion.cfg_dropout=0.05"], keys)
    assert params == {"optim.lr": 3e-4, "diffusion.min_snr_gamma": 5, "diffusion.cfg_dropout": 0.05}
    assert run_name("shapes", 2, params) == ("shapes-2 optim.lr=0.0003,diffusion.min_snr_gamma=5,"
                                             "diffusion.cfg_dropout=0.05")
    assert run_name("shapes", 0, {"optim.lr": 0.00012520653814999459}) == "shapes-0 optim.lr=0.0001252"
    assert run_name("shapes", 1, {}) == "shapes-1"
    assert job_params(["optim.lr=0.0003", "+trainer.max_steps=2"], None) == {"optim.lr": 3e-4, "trainer.max_steps": 2}


def test_objective_value():
    rows = [{"step": 1, "train/loss": 0.5}, {"step": 2, "val/fid": 80.0}, {"step": 4, "val/fid": 60.0},
            {"step": 6, "val/fid": 70.0, "val/clip_score": 21.0}]
    fid = {"metric": "val/fid", "reduce": "best", "direction": "minimize"}
    assert objective_value(fid, {}, rows) == 60.0
    assert objective_value({**fid, "reduce": "last"}, {}, rows) == 70.0
    assert objective_value({**fid, "direction": "maximize"}, {}, rows) == 80.0
    assert objective_value({**fid, "reduce": "last"}, {"val/fid": 65.0}, rows) == 65.0  # the final value
    assert objective_value({"metric": None}, {}, rows) is None
    with pytest.raises(ValueError, match="objective.metric 'val/kid' was never logged"):
        objective_value({**fid, "metric": "val/kid"}, {}, rows)
    with pytest.raises(ValueError, match="objective.reduce must be best or last"):
        objective_value({**fid, "reduce": "mean"}, {}, rows)
    with pytest.raises(ValueError, match="objective.direction must be minimize or maximize"):
        objective_value({**fid, "direction": "down"}, {}, rows)
    assert math.isinf(objective_value({**fid, "metric": "train/loss", "reduce": "last"}, {"train/loss": math.inf},
                                      rows))


def _hydra_config(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_asks_one_task_and_gpu_per_device():
    cfg = _hydra_config(["hydra/launcher=slurm", "trainer.accelerator=gpu", "trainer.devices=4",
                         "hydra.launcher.partition=gpu"])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["tasks_per_node"], launcher["gpus_per_node"], launcher["nodes"]) == (4, 4, 1)
    assert launcher["partition"] == "gpu"
    instantiate(cfg.hydra.launcher)  # submitit's launcher takes every field as it is


def test_optuna_config_minimises_best_fid():
    cfg = _hydra_config(["hparams_search=fid_optuna"])
    assert OmegaConf.to_container(cfg.objective) == {"metric": "val/fid", "reduce": "best", "direction": "minimize"}
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=True)
    assert sweeper["_target_"].endswith("OptunaSweeper") and sweeper["direction"] == "minimize"
    assert set(sweeper["params"]) == {"optim.lr", "diffusion.cfg_dropout", "sampling.guidance_scale"}
    for key in sweeper["params"]:  # every searched key exists in the training config
        assert OmegaConf.select(cfg, key) is not None
    assert cfg.hydra.mode.name == "MULTIRUN"
