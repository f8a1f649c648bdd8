"""The trainer's records, fingerprint and checkpoint integrity: nothing of a run is silently lost or mixed."""
import json
import os

import pytest
from cil_helpers import small_config, synthetic_tasks
from safetensors import safe_open
from safetensors.torch import save_file

from pclr import LRPConfig
from pclr.cil import CILTrainer, TaskPlan
from pclr.cil.checkpointing import SHA_SUFFIX, STATE_KEY, CheckpointError, file_sha256
from pclr.models.tiny import tiny_causal_lm


class Crash(RuntimeError):
    pass


def _config(**kw):
    return small_config("pclr", epochs=2, schedule=[TaskPlan(4), TaskPlan(4)], **kw)


def _crash_at(task, phase):
    def hook(trainer, t, p, s):
        if (t, p) == (task, phase):
            raise Crash(f"killed at task {t} {p}")
    return hook


def _trainer(out, tasks=None, **kw):
    return CILTrainer(tiny_causal_lm(), _config(**kw), tasks or synthetic_tasks(2, n_train=8), output_dir=str(out))


def test_records_survive_a_resume(tmp_path):
    ref = _trainer(tmp_path / "ref")
    ref.run()
    with pytest.raises(Crash):
        _trainer(tmp_path / "crash", on_step=_crash_at(1, "learn")).run()
    resumed = _trainer(tmp_path / "crash")
    resumed.run(resume=True)
    # task 0's learn phase ran before the crash: its count comes back from the checkpoint
    assert resumed.records.trainable_per_task() == ref.records.trainable_per_task()
    assert set(resumed.records.trainable_per_task()) == {0, 1} and all(
        v > 0 for v in resumed.records.trainable_per_task().values())
    assert [(p["task"], p["phase"]) for p in resumed.records.phases] == \
        [(p["task"], p["phase"]) for p in ref.records.phases]
    assert resumed.records.wall_seconds > 0
    state = json.loads((tmp_path / "crash" / "ckpt" / "state.json").read_text())
    assert len(state["records"]) == len(ref.records.phases)


def test_resume_with_other_settings_or_data_is_refused(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Crash):
        _trainer(out, on_step=_crash_at(1, "learn")).run()
    with pytest.raises(CheckpointError, match=r"config\.lr: 0\.03 -> 0\.01"):
        _trainer(out, lr=1e-2).run(resume=True)
    with pytest.raises(CheckpointError, match=r"config\.lrp\.alpha"):
        _trainer(out, lrp=LRPConfig(r=4, alpha=4.0, budget=12, n_shared=2)).run(resume=True)
    with pytest.raises(CheckpointError, match=r"data\.color"):
        _trainer(out, tasks=synthetic_tasks(2, n_train=8, seed=1)).run(resume=True)
    with pytest.raises(CheckpointError, match=r"\bmodel\b"):
        CILTrainer(tiny_causal_lm(seed=1), _config(), synthetic_tasks(2, n_train=8),
                   output_dir=str(out)).run(resume=True)
    _trainer(out).run(resume=True)  # the same run still resumes


def test_a_non_empty_output_dir_needs_overwrite(tmp_path):
    out = tmp_path / "run"
    _trainer(out).run()
    log = (out / "log.jsonl").read_text()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _trainer(out).run()
    assert (out / "log.jsonl").read_text() == log
    _trainer(out).run(overwrite=True)
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    starts = [(e["task"], e["phase"]) for e in events if e["event"] == "phase_start"]
    assert len(starts) == len(set(starts))  # one run in the log, not two


def _damage(path, offset_from_end, data):
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) - offset_from_end: len(raw) - offset_from_end + len(data)] = data
    open(path, "wb").write(bytes(raw))


def test_checkpoint_checksum_is_verified(tmp_path):
    out = tmp_path / "run"
    _trainer(out).run()
    ckpt = out / "ckpt" / "checkpoint.safetensors"
    sha = str(ckpt) + SHA_SUFFIX
    assert open(sha).read().split()[0] == file_sha256(str(ckpt))
    _damage(ckpt, 1200, b"\xff" * 1000)  # tensor data, header intact: safetensors alone would accept it
    with pytest.raises(CheckpointError, match=r"checkpoint\.safetensors is corrupt: its sha256"):
        _trainer(out).run(resume=True)
    os.remove(sha)
    with pytest.raises(CheckpointError, match="no checksum file"):
        _trainer(out).run(resume=True)


def test_nan_in_a_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    _trainer(out).run()
    ckpt = str(out / "ckpt" / "checkpoint.safetensors")
    with safe_open(ckpt, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".B_m"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, ckpt, metadata=meta)
    with open(ckpt + SHA_SUFFIX, "w") as f:  # a consistent checksum: only the NaN check can refuse it
        f.write(file_sha256(ckpt) + "  checkpoint.safetensors\n")
    assert STATE_KEY in meta
    with pytest.raises(CheckpointError, match=f"NaN or Inf in {key}"):
        _trainer(out).run(resume=True)


def test_interrupted_checksum_write_is_completed(tmp_path):
    """A crash between the checkpoint's rename and its checksum's leaves the new checksum pending; it is used."""
    out = tmp_path / "run"
    _trainer(out).run()
    ckpt = str(out / "ckpt" / "checkpoint.safetensors")
    os.replace(ckpt + SHA_SUFFIX, ckpt + SHA_SUFFIX + ".tmp")
    with open(ckpt + SHA_SUFFIX, "w") as f:
        f.write("0" * 64 + "  checkpoint.safetensors\n")  # the previous checkpoint's checksum
    _trainer(out).run(resume=True)
    assert open(ckpt + SHA_SUFFIX).read().split()[0] == file_sha256(ckpt)


def test_sample_without_gpt_turn_is_named_before_training(tmp_path):
    tasks = synthetic_tasks(2, n_train=8)
    tasks[1].train[3] = {"id": "lonely-question", "conversations": [{"from": "human", "value": "why?"}]}
    with pytest.raises(ValueError, match="'lonely-question' has no gpt"):
        CILTrainer(tiny_causal_lm(), _config(), tasks, output_dir=str(tmp_path / "x"))
