"""Checkpoints and exports as a careless user handles them: `vlrl export` never replaces what is not an export,
never leaves a half-written model, names a damaged checkpoint; `--resume` names a damaged run; a full disk is
named whichever library was writing when it filled."""

import errno
import shutil
from pathlib import Path

import pytest
import torch

from vlrl_cli.errors import UserError
from vlrl_cli.train import runs


def full_checkpoint(tmp_path: Path, tiny_model: Path) -> Path:
    """A run whose one checkpoint is a full fine-tune's (its hf/ folder is the tiny model)."""
    ckpt = tmp_path / "run" / "checkpoints" / "step_1"
    shutil.copytree(tiny_model, ckpt / "hf")
    (ckpt.parent / "latest").write_text("step_1")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    return ckpt


def adapter_checkpoint(tmp_path: Path, tiny_model: Path) -> Path:
    """A LoRA run's checkpoint: PEFT's adapter of the tiny model and the run's processor, no hf/."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    ckpt = tmp_path / "lora" / "checkpoints" / "step_1"
    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(tiny_model),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(ckpt / "adapter")
    AutoProcessor.from_pretrained(tiny_model).save_pretrained(ckpt / "adapter")
    (ckpt.parent / "latest").write_text("step_1")
    return ckpt


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".partial" in p.name or ".replaced" in p.name)


def test_export_writes_only_new_folders_or_earlier_exports(tmp_path, tiny_model, cli):
    ckpt = full_checkpoint(tmp_path, tiny_model)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    refused = {  # --out -> what the one-line refusal says
        tmp_path / "run": "checkpoint", ckpt: "checkpoint", ckpt / "hf": "checkpoint",
        ckpt / "adapter": "checkpoint", tmp_path: "checkpoint", tmp_path / "afile": "file",
    }
    for out, says in refused.items():
        for extra in ([], ["--overwrite"]):
            r = cli("export", ckpt, "--out", out, *extra)
            assert r.exit_code == 2 and says in r.output, (out, extra, r.output)
    r = cli("export", ckpt, "--out", mine)
    assert r.exit_code == 2 and "not empty" in r.output, r.output
    r = cli("export", ckpt, "--out", mine, "--overwrite")  # a user's folder is not an earlier export
    assert r.exit_code == 2 and "not a model export" in r.output, r.output
    assert (mine / "notes.txt").read_text() == "keep me" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert (ckpt / "hf" / "config.json").exists() and (tmp_path / "run" / "metrics.jsonl").exists()

    out = tmp_path / "exports" / "step1"
    r = cli("export", tmp_path / "run", "--out", out)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (ckpt / "hf").iterdir())
    r = cli("export", ckpt, "--out", out)  # a second export to the same place: refused, the first kept
    assert r.exit_code == 2 and "--overwrite" in r.output, r.output
    (out / "stale.txt").write_text("from the first export")
    r = cli("export", ckpt, "--out", out, "--overwrite")
    assert r.exit_code == 0, r.output
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()  # replaced whole, not merged into
    assert leftovers(out.parent) == []
    r = cli("export", ckpt, "--out", out / "again")  # nested in the earlier export: refused, it stays whole
    assert r.exit_code == 2 and f"inside the model folder {out}" in r.output, r.output
    assert not (out / "again").exists()


def test_an_export_that_fails_leaves_nothing_that_looks_like_a_model(tmp_path, tiny_model, cli, monkeypatch):
    ckpt = full_checkpoint(tmp_path, tiny_model)
    out = tmp_path / "exports" / "step1"
    real_copytree = shutil.copytree

    def copy_until_full(src, dst, **kw):  # the disk fills half-way: one file written, then ENOSPC
        Path(dst).mkdir(parents=True)
        shutil.copy(Path(src) / "config.json", dst)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.shutil, "copytree", copy_until_full)
    r = cli("export", ckpt, "--out", out)
    assert r.exit_code == 2 and "no space left on the device" in r.output, r.output
    assert not out.exists() and leftovers(out.parent) == []
    monkeypatch.setattr(runs.shutil, "copytree", real_copytree)

    # a damaged source is named, and nothing is written: a truncated weight file, then a deleted one
    weights = ckpt / "hf" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    r = cli("export", ckpt, "--out", out)
    assert r.exit_code == 2 and "model.safetensors" in r.output and "not a complete" in r.output, r.output
    weights.unlink()
    r = cli("export", ckpt, "--out", out)
    assert r.exit_code == 2 and "no weight files" in r.output, r.output
    assert not out.exists()


@pytest.mark.parametrize("damage", ["no adapter weights", "truncated adapter weights", "adapter config not JSON",
                                    "no tokenizer"])
def test_a_damaged_adapter_checkpoint_is_named_by_export_and_eval(tmp_path, tiny_model, colors_data, cli, damage):
    ckpt = adapter_checkpoint(tmp_path, tiny_model)
    adapter = ckpt / "adapter"
    weights = adapter / "adapter_model.safetensors"
    if damage == "no adapter weights":
        weights.unlink()
        says = "adapter_model.safetensors"
    elif damage == "truncated adapter weights":
        weights.write_bytes(weights.read_bytes()[:100])
        says = "not a complete safetensors file"
    elif damage == "adapter config not JSON":
        (adapter / "adapter_config.json").write_text("{not json")
        says = "adapter_config.json"
    else:
        (adapter / "tokenizer.json").unlink()
        (adapter / "tokenizer_config.json").unlink()
        says = "processor files cannot be read"
    r = cli("export", ckpt, "--out", tmp_path / "merged")
    assert r.exit_code == 2 and says in r.output, r.output
    r = cli("eval", ckpt, colors_data / "val.parquet", "--out", tmp_path / "ev", "--limit", "1")
    assert r.exit_code == 2 and says in r.output, r.output
    assert not (ckpt / "hf").exists() and not (tmp_path / "merged").exists() and leftovers(ckpt) == []


def test_an_adapter_checkpoint_exports_once_and_loads(tmp_path, tiny_model, colors_data, cli):
    from transformers import AutoModelForImageTextToText

    ckpt = adapter_checkpoint(tmp_path, tiny_model)
    r = cli("export", ckpt, "--out", tmp_path / "merged")
    assert r.exit_code == 0, r.output
    merged = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged")
    assert sum(p.numel() for p in merged.parameters()) > 0 and (tmp_path / "merged" / "tokenizer_config.json").exists()
    assert leftovers(tmp_path) == []
    # eval of the run directory says which checkpoint that is, and merges it in place once
    r = cli("eval", tmp_path / "lora", colors_data / "val.parquet", "--out", tmp_path / "ev", "--limit", "1",
            "--max-new-tokens", "2")
    assert r.exit_code == 0 and f"model: {ckpt}" in r.output.replace("\n", ""), r.output
    assert (ckpt / "hf" / "config.json").exists() and leftovers(ckpt) == []


def test_resume_names_a_damaged_run(tmp_path):
    ckpts = tmp_path / "run" / "checkpoints"
    for step in (1, 2):
        (ckpts / f"step_{step}" / "ds" / "state").mkdir(parents=True)
    for marker in ("", "step_9", "checkpoints", "../.."):
        (ckpts / "latest").write_text(marker)
        with pytest.raises(UserError, match="not a finished checkpoint; the newest finished one there is step_2"):
            runs.latest_checkpoint(tmp_path / "run")
    (ckpts / "latest").write_text("step_2")
    assert runs.latest_checkpoint(tmp_path / "run") == ckpts / "step_2"

    # a truncated DeepSpeed state file is named before DeepSpeed reads it (the policy is never touched)
    state = ckpts / "step_2" / "ds" / "state" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.ones(1000)}}, state)
    state.write_bytes(state.read_bytes()[:2000])
    with pytest.raises(UserError, match="mp_rank_00_model_states.pt: a damaged checkpoint file"):
        runs.load_checkpoint(None, ckpts / "step_2")


@pytest.mark.parametrize("raised", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on "
                 "device\" }) (os error 28)"),  # how safetensors reports it
    shutil.Error([("a", "b", "[Errno 28] No space left on device: 'b'")]),  # how copytree gathers it
])
def test_a_full_disk_is_named_whichever_library_was_writing(tmp_path, raised):
    with pytest.raises(UserError, match=r"export: no space left on the device \(.*out\)"):
        with runs.writing(tmp_path / "out", "export"):
            raise raised
    with pytest.raises(ValueError):  # anything else passes through unchanged
        with runs.writing(tmp_path / "out", "export"):
            raise ValueError("not the disk")


def test_the_free_space_check_states_what_it_needs(tmp_path, monkeypatch):
    from collections import namedtuple

    # /proc, /sys: no disk at all, where "0.00 GB free; free some space" sent users to clean a disk
    with pytest.raises(UserError) as e:
        runs.check_free_space(Path("/proc/vlrl-export"), 10, "export")
    assert str(e.value) == "export: /proc/vlrl-export is on a virtual file system (/proc), not a disk; write it elsewhere"
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 20 * 10**6, 20 * 10**6))
    with pytest.raises(UserError) as e:
        runs.check_free_space(tmp_path, 10 * 10**6, "checkpoint step_1")
    # 10 MB of checkpoint and the margin do not fit 20 MB: the message says so without contradicting itself
    assert "needs ~0.08 GB (with a 64 MB margin), 0.02 GB free" in str(e.value), e.value
    assert "kept" not in str(e.value)  # nothing is claimed about a checkpoint the caller did not name


def test_ctrl_c_names_what_the_run_left_and_the_command_that_goes_on(tmp_path):
    run = tmp_path / "run"
    hint = runs.after_interrupt(run, Path("recipes/x.yaml"), ["rollout.n=4", "run.name=my run"])
    assert hint == f"stopped before its first checkpoint; `vlrl train recipes/x.yaml --set rollout.n=4 --set 'run.name=my run' --overwrite` starts {run} again"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_3")
    hint = runs.after_interrupt(run, Path("recipes/x.yaml"), [])
    assert hint == f"stopped; its last checkpoint is {run / 'checkpoints' / 'step_3'}: `vlrl train recipes/x.yaml --resume` goes on from it"
    (run / "checkpoints" / "latest").write_text("")  # a damaged marker: --resume names it; never --overwrite
    assert runs.after_interrupt(run, Path("recipes/x.yaml"), []).endswith("--resume` goes on from its last checkpoint")
