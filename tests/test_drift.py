"""check-drift on the CPU with the hf engine and the tiny model: every check can fail, and does when it should."""

import copy
import hashlib
import json

import pytest

from vlrl_cli.tools.drift import DriftOptions, check_drift, drift_stats
from vlrl_cli.rollout.engines import Sampling
from vlrl_cli.errors import UserError
from vlrl_cli.model.loading import load_processor

import numpy as np

pytestmark = pytest.mark.model  # also run on the oldest supported transformers (make test-floor)


def checks(report):
    return {c["name"]: c for c in report["checks"]}


def test_identical_settings_give_no_drift_and_exit_0(cli, tiny_model, colors_data, tmp_path):
    out = tmp_path / "drift.json"
    r = cli("check-drift", tiny_model, colors_data / "train.parquet", "--samples", 6, "--max-new-tokens", 12,
            "--zero-stage", 2, "--max-mean", 1e-4, "--max-abs", 1e-3, "--json", out, "--plot", tmp_path / "d.png")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert report["token_abs_diff"]["mean"] < 1e-5 and report["token_abs_diff"]["max"] < 1e-4
    assert report["stats"]["overall"]["tokens"] > 6
    c = checks(report)
    for name in ("prompt_ids", "image_tensors", "image_token_counts", "sampling_truncation", "max_mean", "max_abs"):
        assert c[name]["passed"] is True, c[name]
    assert abs(report["stats"]["overall"]["is_ratio"]["mean"] - 1) < 1e-4
    from PIL import Image

    assert Image.open(tmp_path / "d.png").size[0] > 500


def test_bf16_engine_against_fp32_trainer_drifts_and_thresholds_drive_the_exit_code(cli, tiny_model, colors_data, tmp_path):
    base = ["check-drift", tiny_model, colors_data / "train.parquet", "--samples", 6, "--max-new-tokens", 12,
            "--engine-dtype", "bf16", "--train-dtype", "fp32"]
    out = tmp_path / "d.json"
    assert cli(*base, "--max-mean", 1e-5, "--json", out).exit_code == 1
    report = json.loads(out.read_text())
    mean = report["token_abs_diff"]["mean"]
    assert 1e-4 < mean < 0.1, mean  # bf16 rounding: measurable, not broken
    assert checks(report)["max_mean"]["passed"] is False
    assert checks(report)["image_tensors"]["passed"] is True  # the pixels agree: the drift is numerics
    assert cli(*base, "--max-mean", 0.1, "--max-abs", 1.0).exit_code == 0


def test_different_normalisation_on_the_engine_side_is_caught(tiny_model, colors_data):
    engine_proc = load_processor(str(tiny_model))
    engine_proc.image_processor.image_mean = [0.5, 0.5, 0.5]
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=4, sampling=Sampling(max_new_tokens=8)), engine_processor=engine_proc)
    c = checks(report)
    assert c["image_tensors"]["passed"] is False and "max |pixel difference|" in c["image_tensors"]["detail"]
    assert c["prompt_ids"]["passed"] is True  # same grid, so the ids agree: only the pixel check can see it
    assert report["passed"] is False


def test_a_different_resize_on_the_engine_side_is_caught_and_named(cli, tiny_model, colors_data):
    engine_proc = load_processor(str(tiny_model))
    engine_proc.image_processor.size = {"shortest_edge": 28 * 28, "longest_edge": 28 * 28}
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=4, sampling=Sampling(max_new_tokens=8)), engine_processor=engine_proc)
    c = checks(report)
    assert c["image_tensors"]["passed"] is False and "different resize" in c["image_tensors"]["detail"]
    assert c["prompt_ids"]["passed"] is False and c["image_token_counts"]["passed"] is False


def test_top_p_below_one_is_flagged_with_the_fix(tiny_model, colors_data):
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=3, sampling=Sampling(top_p=0.9, max_new_tokens=8)))
    c = checks(report)["sampling_truncation"]
    assert c["passed"] is False and c["severity"] == "warning" and "top_p=1.0" in c["fix"]
    assert report["passed"] is True  # a warning, not a failure
    greedy = check_drift(str(tiny_model), str(colors_data / "train.parquet"), DriftOptions(samples=2, sampling=Sampling(0.0, 1.0, 4, 0)))
    assert checks(greedy)["sampling_temperature"]["passed"] is False


class StaleEncoderCacheEngine:
    """An hf engine with a vision-encoder output cache keyed by the pixels, which a weight update does NOT
    clear (the vLLM bug class the after-update check exists for)."""

    def __new__(cls, model, processor):
        from vlrl_cli.rollout.engines.hf import HFEngine

        engine = HFEngine(model, processor, own_preprocessing=True)
        cache = {}

        def pre(module, args, kwargs):
            module._key = hashlib.sha256(args[0].detach().float().numpy().tobytes()).hexdigest()

        def post(module, args, kwargs, output):
            # copies: the caller rewrites fields of the output object it gets
            return copy.copy(cache.setdefault(module._key, copy.copy(output)))

        engine.model.model.visual.register_forward_pre_hook(pre, with_kwargs=True)
        engine.model.model.visual.register_forward_hook(post, with_kwargs=True)
        return engine


@pytest.mark.parametrize("stale", [False, True])
def test_after_update_rechecks_seen_images(tiny_model, colors_data, stale):
    proc = load_processor(str(tiny_model))
    engine = StaleEncoderCacheEngine(str(tiny_model), proc) if stale else None
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=4, sampling=Sampling(max_new_tokens=8), after_update=True, perturb=0.3, zero_stage=3),
                         engine=engine)
    c = checks(report)
    after = report["after_update"]
    assert c["update_visible"]["passed"] is True, c["update_visible"]
    seen, unseen = after["seen"]["overall"]["abs_diff"]["mean"], after["unseen"]["overall"]["abs_diff"]["mean"]
    if stale:
        assert c["after_update_seen_images"]["passed"] is False and seen > 10 * unseen, (seen, unseen)
        assert "vision-encoder" in c["after_update_seen_images"]["fix"]
    else:
        assert c["after_update_seen_images"]["passed"] is True and seen < 1e-4, (seen, unseen)


def test_statistics_against_hand_values():
    eng = np.log(np.array([0.5, 0.25, 0.5, 0.1]))
    tr = np.log(np.array([0.5, 0.5, 0.25, 0.1]))
    seq = np.array([0, 0, 1, 1])
    s = drift_stats(eng, tr, seq)
    ln2 = np.log(2)
    assert s["abs_diff"]["mean"] == pytest.approx(ln2 / 2) and s["abs_diff"]["max"] == pytest.approx(ln2)
    assert s["signed_mean"] == pytest.approx(0.0)
    # ratios p_train / p_engine: 1, 2, 0.5, 1
    assert s["is_ratio"]["mean"] == pytest.approx(1.125) and s["is_ratio"]["min"] == pytest.approx(0.5)
    assert s["k3_kl"] == pytest.approx(((2 - 1 - ln2) + (0.5 - 1 + ln2)) / 4)
    assert s["chi2_token"] == pytest.approx((1 + 0.25) / 4)
    assert s["chi2_sequence"] == pytest.approx(((2 - 1) ** 2 + (0.5 - 1) ** 2) / 2)  # sequence ratios 2 and 0.5
    assert s["is_ratio"]["ess_token"] == pytest.approx(4.5 ** 2 / (4 * 6.25))
    assert s["prob_abs_diff"]["max"] == pytest.approx(0.25)


def test_after_update_from_a_checkpoint(tiny_model, colors_data, tmp_path):
    from vlrl_cli.model.tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", "qwen2_5_vl", seed=1)  # the same architecture, other weights
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=3, sampling=Sampling(max_new_tokens=6), after_update=True, update_from=str(other)))
    c = checks(report)
    assert "weights of" in report["after_update"]["update"]
    assert c["update_visible"]["passed"] is True and c["after_update_seen_images"]["passed"] is True
    assert report["after_update"]["seen"]["overall"]["abs_diff"]["max"] < 1e-4  # the engine got the new weights


def test_multi_turn_drift_is_split_by_turn(tiny_model, tmp_path):
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    prepare(PrepareOptions(source="maze2d", out=tmp_path / "maze", workers=1,
                           source_opts={"rows": 3, "val_rows": 1, "maze_size": 3}))
    report = check_drift(str(tiny_model), str(tmp_path / "maze" / "train.parquet"),
                         DriftOptions(samples=2, sampling=Sampling(max_new_tokens=6), max_turns=3))
    turns = report["stats"]["by_turn"]
    assert {"turn_1", "turn_2", "turn_3"} <= set(turns)
    # every turn starts after an image (the prompt's, then each observation's frame)
    assert report["stats"]["by_position"]["after_image"]["tokens"] == 2 * 3 * 4
    assert report["token_abs_diff"]["max"] < 1e-4
    assert checks(report)["image_tensors"]["passed"] is True  # observation frames included


def test_models_resolve_from_checkpoints_and_run_dirs(tmp_path):
    from vlrl_cli.train.runs import resolve_model

    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    (ckpt / "hf").mkdir(parents=True)
    (ckpt / "hf" / "config.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_3")
    assert resolve_model(str(ckpt)) == str(ckpt / "hf")
    assert resolve_model(str(tmp_path / "run")) == str(ckpt / "hf")
    assert resolve_model("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"
    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="without a finished checkpoint"):
        resolve_model(str(tmp_path / "empty"))


def test_compiled_trainer_agrees_before_and_after_an_update(tiny_model, colors_data):
    """--compile: the training forward `vlrl train` runs on a GPU (compiled blocks) against the hf engine,
    a LoRA policy under ZeRO-2, before and after an adapter change pushed through the sync path."""
    report = check_drift(str(tiny_model), str(colors_data / "train.parquet"),
                         DriftOptions(samples=4, sampling=Sampling(max_new_tokens=8), after_update=True, perturb=0.3,
                                      zero_stage=2, lora_rank=4, compile=True))
    c = checks(report)
    assert report["token_abs_diff"]["mean"] < 1e-5 and report["token_abs_diff"]["max"] < 1e-4
    assert c["update_visible"]["passed"] is True, c["update_visible"]
    assert c["after_update_seen_images"]["passed"] is True
    assert report["after_update"]["seen"]["overall"]["abs_diff"]["max"] < 1e-4


def test_compile_with_zero3_is_refused_before_loading(tiny_model, colors_data):
    with pytest.raises(UserError, match="--compile needs --zero-stage 0-2"):
        check_drift(str(tiny_model), str(colors_data / "train.parquet"), DriftOptions(zero_stage=3, compile=True))


def test_packed_mode_agrees_and_a_budget_that_packs_nothing_fails(cli, tiny_model, colors_data, tmp_path):
    """--pack-tokens scores the rollouts in packed rows, as trainer.pack_tokens trains: they agree with the engine
    as the padded path does. A budget shorter than the sequences puts each in a row of its own; the gate must not
    pass then, since the packed path it was asked about never ran."""
    base = ["check-drift", tiny_model, colors_data / "train.parquet", "--samples", 6, "--max-new-tokens", 12,
            "--max-mean", 1e-4, "--max-abs", 1e-3]
    out = tmp_path / "packed.json"
    assert cli(*base, "--pack-tokens", 4096, "--json", out).exit_code == 0
    report = json.loads(out.read_text())
    packed = checks(report)["packed_rows"]
    assert packed["passed"] is True and "1 packed rows" in packed["detail"], packed
    assert report["token_abs_diff"]["max"] < 1e-4

    out = tmp_path / "alone.json"
    r = cli(*base, "--pack-tokens", 8, "--json", out)
    assert r.exit_code == 1, r.output
    alone = checks(json.loads(out.read_text()))["packed_rows"]
    assert alone["passed"] is False and "packing was not tested" in alone["detail"], alone
    assert "packed_rows" in r.output
