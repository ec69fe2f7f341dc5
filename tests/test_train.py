"""Training stages, freezing, LoRA, data, schedule, resume after a kill, and 2-process runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from mixerzoo.tasks.loop import IGNORE
from mixerzoo.train import (ByteTokenizer, Example, JSONLDataset, LoRAConfig, TrainConfig, apply_lora, build_model,
                            collate, fold_lora, load_model, parameter_groups, save_model, train)
from mixerzoo.train.config import ModelSource
from mixerzoo.train.data import build_dataset
from mixerzoo.train.loop import example_indices, lr_factor
from mixerzoo.vlm import VLM, vlm_recipe

MQAR = {"source": "mqar", "task": {"seq_len": 24, "n_pairs": 3, "vocab_size": 248}, "n_examples": 64}


def _config(tmp_path: Path, **fields) -> TrainConfig:
    base = dict(stage="sft", out_dir=tmp_path / "run", student={"recipe": "transformer", "vlm": False}, data=MQAR,
                steps=8, micro_batch_size=4, train=["all"], progress=False, optim={"lr": 3e-3})
    return TrainConfig.model_validate({**base, **fields})


def _losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory) -> Path:
    """A tiny full-attention VLM teacher with random weights, saved."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(VLM(vlm_recipe("transformer", "tiny")), path)
    return path


def _assert_lowered(losses: list[float]) -> None:
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-2:]) < losses[0], f"loss did not go down: {losses}"


def test_sft_lowers_cross_entropy(tmp_path):
    summary = train(_config(tmp_path, steps=10))
    _assert_lowered(summary["losses"])
    assert _losses(tmp_path / "run") == summary["losses"]  # metrics.jsonl holds every step
    assert isinstance(load_model(tmp_path / "run" / "model.safetensors"), torch.nn.Module)


@pytest.mark.parametrize("stage, extra", [("distill-layers", {}), ("distill-logits", {}),
                                          ("distill-logits", {"layer_mse_weight": 0.5, "kl_direction": "teacher||student"})])
def test_distillation_stages_lower_their_loss(tmp_path, teacher_path, stage, extra):
    config = _config(tmp_path, stage=stage, teacher={"checkpoint": teacher_path},
                     student={"recipe": "infinitevl", "convert_from_teacher": True}, train=None, steps=8, **extra)
    summary = train(config)
    _assert_lowered(summary["losses"])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = {"distill-layers": {"loss_layer_mse"}, "distill-logits": {"loss_kl"} | ({"loss_layer_mse"} if extra else set())}
    assert expected[stage] <= set(rows[0])


def test_long_sft_packs_documents_and_trains_only_lora(tmp_path, teacher_path):
    """long-sft on packed rows with LoRA: the loss goes down, only adapters train, and the saved
    model (adapters folded in) differs from the start only in the adapted projections."""
    config = _config(tmp_path, stage="long-sft", student={"checkpoint": teacher_path}, train=None, steps=8,
                     data={**MQAR, "pack": True, "max_length": 80}, lora={"targets": ["q_proj", "v_proj"], "rank": 4})
    summary = train(config)
    _assert_lowered(summary["losses"])
    assert summary["trainable"] and all("lora_" in name for name in summary["trainable"])
    before, after = load_model(teacher_path).state_dict(), load_model(tmp_path / "run" / "model.safetensors").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed), sorted(changed)[:4]


def test_distill_logits_is_zero_for_a_copy_of_the_teacher(tmp_path, teacher_path):
    """KL of a model against itself is 0 (both directions), so the student's first loss is ~0."""
    for direction in ("student||teacher", "teacher||student"):
        config = _config(tmp_path / direction.replace("|", "_"), stage="distill-logits", teacher={"checkpoint": teacher_path},
                         student={"checkpoint": teacher_path}, steps=1, kl_direction=direction)
        assert abs(train(config)["losses"][0]) < 1e-6


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


@pytest.mark.parametrize("policy", [None, ["created"], ["mlp", "norms"], ["vision", "merger"], ["embeddings", "attention"]])
def test_freezing_trains_exactly_the_named_groups(tmp_path, teacher_path, policy):
    """Parameters in the named groups change; every other parameter is bit-identical after training."""
    config = _config(tmp_path, teacher={"checkpoint": teacher_path}, train=policy, steps=2,
                     student={"recipe": "infinitevl", "convert_from_teacher": True}, data=_jsonl_data(tmp_path))
    teacher = load_model(teacher_path)
    before = build_model(config.student, teacher)
    groups = parameter_groups(before, teacher)
    named = set().union(*(groups[g] for g in config.train_groups))
    initial = _snapshot(before)
    after = _snapshot(load_model(train(config)["out_dir"] + "/model.safetensors"))
    changed = {k for k in initial if not torch.equal(initial[k], after[k])}
    assert changed <= named, f"frozen parameters changed: {sorted(changed - named)[:5]}"
    # a trained tensor may keep its value only if it got no gradient signal (e.g. a zero-initialised gate)
    assert len(changed) >= 0.8 * len(named), f"only {len(changed)} of {len(named)} trainable tensors changed"


def test_unknown_group_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown parameter group"):
        train(_config(tmp_path, train=["mlps"]))


def test_lora_trains_only_adapters_and_folds_into_plain_linears():
    torch.manual_seed(0)
    model = build_model(ModelSource(recipe="infinitevl", vlm=False))
    ids = torch.randint(0, 200, (2, 12))
    reference, _ = model(ids)
    wrapped = apply_lora(model, LoRAConfig(targets=["q_proj", "v_proj"], rank=4))
    assert wrapped and all(w.endswith(("q_proj", "v_proj")) for w in wrapped)
    groups = parameter_groups(model)
    assert groups["lora"] and all("lora_" in name for name in groups["lora"])
    same, _ = model(ids)
    # B = 0 at init: a no-op, up to float32 rounding (the wrapped projections no longer run fused
    # with their neighbours, which groups the matmul's sums differently)
    torch.testing.assert_close(same, reference)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    adapted, _ = model(ids)
    plain = build_model(ModelSource(recipe="infinitevl", vlm=False))
    plain.load_state_dict(fold_lora(model.state_dict(), LoRAConfig(targets=["q_proj", "v_proj"], rank=4)))
    folded, _ = plain(ids)
    # float32: the folded weight rounds once per element, the adapter path adds two matmuls
    torch.testing.assert_close(folded, adapted, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(adapted, reference)


@pytest.mark.parametrize("recipe", ["infinitevl", "mamba2", "lfm2"])
def test_lora_on_the_residual_projection_keeps_every_mixer_running(recipe):
    """A LoRA-wrapped o_proj / out_proj (the projection a mixer's new state reads its device and dtype from)
    still lets the model make fresh states: with and without them given, and for packed documents."""
    torch.manual_seed(0)
    model = build_model(ModelSource(recipe=recipe, vlm=False))
    apply_lora(model, LoRAConfig(targets=["o_proj", "out_proj"], rank=2))
    ids = torch.randint(0, 200, (2, 10))
    logits, state = model(ids)
    assert torch.isfinite(logits).all()
    for layer in model.layers:
        layer.mixer.init_state(2)  # no device or dtype given: read from the wrapped projection
    packed = model(ids, documents=torch.tensor([[0] * 4 + [1] * 6, [0] * 10]))
    assert torch.isfinite(packed[0] if isinstance(packed, tuple) else packed).all()


def _png(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(path)


def _jsonl_data(tmp_path: Path) -> dict:
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    lines = []
    for i in range(8):
        _png(folder / f"img{i}.png", i)
        lines.append(json.dumps({"prompt": f"<image>what is image {i}?", "answer": str(i % 3), "images": [f"img{i}.png"]}))
    lines.append(json.dumps({"prompt": "text only", "answer": "ok"}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return {"source": "jsonl", "path": folder / "train.jsonl"}


def test_jsonl_dataset_labels_only_answer_tokens(tmp_path):
    spec = vlm_recipe("transformer", "tiny")
    data = JSONLDataset(_jsonl_data(tmp_path)["path"], ByteTokenizer(), spec.processor)
    example = data[0]
    answer = ByteTokenizer().encode("0")
    labelled = (example.labels != IGNORE).nonzero().flatten()
    assert labelled.tolist() == list(range(len(example.input_ids) - 1 - len(answer), len(example.input_ids) - 1))
    assert example.labels[labelled].tolist() == example.input_ids[labelled + 1].tolist()
    assert int((example.input_ids == spec.processor.image_pad_id).sum()) == int(example.image_grid_thw.prod(-1).sum()) // 4
    assert data[8].pixel_values is None


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "<image> x", "answer": "y"}', "1 <image> marker"),
    ('{"prompt": "x"}', "'prompt' and 'answer'"),
    ('{"prompt": "x", "answer": "y", "image": []}', "unknown field"),
    ("not json", "not JSON"),
])
def test_jsonl_errors_name_the_line_and_field(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=message) as error:
        JSONLDataset(path, ByteTokenizer(), vlm_recipe("transformer", "tiny").processor)
    assert "bad.jsonl:1" in str(error.value)


@pytest.mark.parametrize("image, message", [
    ("missing.png", r"bad.jsonl:2: image 'missing.png' not found"),
    ("notes.png", r"bad.jsonl:2: image 'notes.png' is not a readable image"),
    ("../outside.png", r"bad.jsonl:2: image '../outside.png' lies outside the data folder .*images_anywhere"),
])
def test_every_image_is_checked_before_training_and_stays_in_the_data_folder(tmp_path, image, message):
    """A missing, undecodable or escaping image fails when the dataset is made, naming the line."""
    folder = tmp_path / "data"
    folder.mkdir()
    _png(folder / "good.png", 0)
    _png(tmp_path / "outside.png", 1)
    (folder / "notes.png").write_text("not an image")
    lines = [{"prompt": "<image>a", "answer": "b", "images": ["good.png"]},
             {"prompt": "<image>a", "answer": "b", "images": [image]}]
    path = folder / "bad.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    processor = vlm_recipe("transformer", "tiny").processor
    with pytest.raises(ValueError, match=message):
        JSONLDataset(path, ByteTokenizer(), processor)
    if image.startswith(".."):  # allowed when the config says so
        assert len(JSONLDataset(path, ByteTokenizer(), processor, images_anywhere=True)) == 2


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8), extra=st.integers(0, 6))
def test_collate_packs_every_example_in_order(lengths, extra):
    examples = [Example(torch.full((n,), i + 1), torch.full((n,), i + 1)) for i, n in enumerate(lengths)]
    pack = max(lengths) + extra
    batch = collate(examples, pack_length=pack)
    assert batch["input_ids"].shape[1] == pack
    ids, docs = batch["input_ids"][batch["valid"]], batch["documents"][batch["valid"]]
    assert ids.tolist() == [i + 1 for i, n in enumerate(lengths) for _ in range(n)]  # every token, in order
    assert (batch["labels"][~batch["valid"]] == IGNORE).all() and (batch["documents"][~batch["valid"]] == -1).all()
    for row in range(batch["input_ids"].shape[0]):  # a document never spans rows; ids restart per row
        row_docs = batch["documents"][row][batch["valid"][row]]
        assert row_docs[0] == 0 and (row_docs.diff() >= 0).all()
    assert docs.numel() == sum(lengths)


@given(n=st.integers(1, 20), batch=st.integers(1, 8), step=st.integers(0, 30), seed=st.integers(0, 5))
def test_data_order_is_epochs_of_permutations(n, batch, step, seed):
    stream = [i for s in range(step + 1) for i in example_indices(s, n, batch, seed)]
    for epoch_start in range(0, len(stream) - n + 1, n):
        assert sorted(stream[epoch_start:epoch_start + n]) == list(range(n))
    assert example_indices(step, n, batch, seed) == example_indices(step, n, batch, seed)


def test_schedule_warms_up_then_decays_to_the_floor(tmp_path):
    config = _config(tmp_path, steps=100, optim={"lr": 1.0, "warmup_steps": 10, "min_lr_ratio": 0.1})
    factors = [lr_factor(s, config) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert factors[10] == pytest.approx(1.0) and lr_factor(100, config) == pytest.approx(0.1)


@pytest.mark.parametrize("recipe", ["transformer", "infinitevl", "mamba2-swa"])
def test_bfloat16_autocast_trains(tmp_path, recipe):
    """bf16 autocast over every mixer kind (the recurrent ops keep computing in float32)."""
    config = _config(tmp_path, dtype="bfloat16", steps=30, student={"recipe": recipe, "vlm": False})
    _assert_lowered(train(config)["losses"])


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="needs a teacher"):
        _config(tmp_path, stage="distill-logits")
    with pytest.raises(ValueError, match="max_length"):
        _config(tmp_path, data={**MQAR, "pack": True})
    with pytest.raises(ValueError, match="micro_batchsize"):
        _config(tmp_path, micro_batchsize=2)


def _write_yaml(path: Path, config: TrainConfig) -> Path:
    data = config.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "mixerzoo", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_resume_after_a_kill_gives_the_same_losses(tmp_path):
    """SIGKILL mid-run, run the same command again: it resumes from the last checkpoint and every
    logged loss equals the uninterrupted run's, bit for bit."""
    steps = 60
    whole = _config(tmp_path / "whole", steps=steps, checkpoint_every=5, optim={"lr": 3e-3, "warmup_steps": 5})
    train(whole)
    killed = whole.model_copy(update={"out_dir": tmp_path / "killed"})
    path = _write_yaml(tmp_path / "killed.yaml", killed)
    process = subprocess.Popen(_cli("sft", str(path)), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = killed.out_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(metrics.read_text().splitlines()) if metrics.exists() else 0
    assert 10 <= done < steps, f"the kill came at step {done}; the test needs it mid-run"
    assert not (killed.out_dir / "model.safetensors").exists()
    result = subprocess.run(_cli("sft", str(path)), env=_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    resumed_at = int(result.stdout.split("steps ")[1].split("..")[0])
    assert resumed_at >= 10 and resumed_at % 5 == 0, result.stdout  # from a checkpoint, not from scratch
    assert _losses(killed.out_dir) == _losses(whole.out_dir)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path):
    train(_config(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"\['optim'\] differ"):
        train(_config(tmp_path, steps=4, optim={"lr": 1e-4}))
    assert train(_config(tmp_path, steps=4))["start_step"] == 2  # more steps of the same run: resumes


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tmp_path, strategy):
    """torchrun with 2 gloo processes and half the micro-batch equals 1 process with the same
    global batch (float32; the two sum gradients in a different order: rtol 1e-5)."""
    one = _config(tmp_path / "one", steps=4, student={"recipe": "infinitevl", "vlm": False}, micro_batch_size=4)
    train(one)
    two = one.model_copy(update={"out_dir": tmp_path / "two", "micro_batch_size": 2, "distributed": strategy})
    path = _write_yaml(tmp_path / "two.yaml", two)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mixerzoo", "sft", str(path)]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_allclose(_losses(two.out_dir), _losses(one.out_dir), rtol=1e-5, atol=0)
    a = load_model(one.out_dir / "model.safetensors").state_dict()
    b = load_model(two.out_dir / "model.safetensors").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5, msg=name)


def _demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo", Path(__file__).parents[1] / "experiments" / "train_demo.py")
    demo = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = demo  # dataclasses look their module up
    spec.loader.exec_module(demo)
    return demo


def test_end_to_end_demo_runs_at_a_minimal_scale(tmp_path):
    """experiments/train_demo.py: every stage runs from the YAMLs, the table and plot are written."""
    demo = _demo()
    result = demo.main(["--out", str(tmp_path), "--scale", "0.005", "--test-examples", "8", "--examples", "64",
                        "--threads", "1"])
    runs = [row["run"] for row in result["rows"]]
    assert runs == ["teacher", "converted, untrained", "distill-layers", "distill-logits", "sft", "long-sft", "scratch"]
    assert all(0 <= row["accuracy"] <= 1 for row in result["rows"])
    scratch = next(row for row in result["rows"] if row["run"] == "scratch")
    stages = demo.PIPELINES["visual"].stages[1:]
    assert scratch["steps"] == sum(row["steps"] for row in result["rows"] if row["run"] in stages)
    for name in ("summary.json", "summary.md", "losses.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_text_demo_shares_one_teacher_and_scores_by_position(tmp_path):
    """The real-text pipeline: one teacher for every seed, each seed's student and scratch scored by
    validation loss overall and per position span, the overall loss the mean of the spans'."""
    demo = _demo()
    result = demo.main(["--pipeline", "text", "--out", str(tmp_path), "--scale", "0.002", "--test-examples", "4",
                        "--examples", "32", "--threads", "1", "--seeds", "3", "4"])
    runs = [(row["run"], row["seed"]) for row in result["rows"]]
    student = ["converted, untrained", "text-distill-layers", "text-distill-logits", "text-sft", "scratch"]
    assert runs == ([("text-teacher", 3)] + [(run, 3) for run in student] + [("scratch, teacher's tokens", 3)]
                    + [(run, 4) for run in student])
    for row in result["rows"]:
        spans = [row[f"loss_{a}_{b}"] for a, b in demo.TEXT_BUCKETS]
        assert np.all(np.isfinite(spans)) and 0 < row["val_loss"] < 10
        weights = [b - a for a, b in demo.TEXT_BUCKETS]
        assert row["val_loss"] == pytest.approx(np.average(spans, weights=weights), rel=1e-6)
    first = {row["run"]: row for row in result["rows"] if row["seed"] == 3}
    assert first["scratch"]["tokens"] == sum(first[name]["tokens"] for name in student[1:4])
    assert first["scratch, teacher's tokens"]["tokens"] == first["text-teacher"]["tokens"]
    assert "| text-teacher | sft | 1 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.parametrize("pipeline", ["visual", "text"])
def test_published_demo_tables_are_their_recorded_results_on_this_code(pipeline):
    """docs/TRAINING.md shows exactly the table of docs/results/train-<pipeline>.json, which records its
    command and commit and was measured on the current training code (re-run the command on a change)."""
    demo = _demo()
    root = Path(__file__).parents[1]
    result = json.loads((root / "docs" / "results" / f"train-{pipeline}.json").read_text())
    assert result["pipeline"] == pipeline and len(result["seeds"]) >= 3 and result["commit"]
    assert demo.render_table(result) in (root / "docs" / "TRAINING.md").read_text(), "docs/TRAINING.md's table differs"
    assert result["code_digest"] == demo.code_digest(pipeline), (
        f"the training code changed since the published {pipeline} table was measured: run "
        f"`{result['command']}` and copy its summary.json to docs/results/train-{pipeline}.json")


def test_text_windows_train_a_converted_decoder(tmp_path):
    """The stdlib-text source gives next-byte labels; a text Decoder teacher converts to infinitevl's
    layout (copied weights, new Gated DeltaNet layers) and distils."""
    torch.manual_seed(0)
    save_model(build_model(ModelSource(recipe="transformer", vlm=False)), tmp_path / "teacher.safetensors")
    text = {"source": "stdlib-text", "task": {"seq_len": 16}, "n_examples": 8}
    config = _config(tmp_path, stage="distill-layers", data=text, steps=3, train=None,
                     teacher={"checkpoint": tmp_path / "teacher.safetensors"},
                     student={"recipe": "infinitevl", "convert_from_teacher": True})
    dataset = build_dataset(config.data, vocab_size=256, processor=None)
    example = dataset[0]
    assert example.input_ids.shape == (16,) and torch.equal(example.input_ids[1:], example.labels[:-1])
    teacher = load_model(tmp_path / "teacher.safetensors")
    student = build_model(config.student, teacher)
    kinds = [layer.mixer.type for layer in student.spec.layers]
    assert "gated_deltanet" in kinds and "attention" in kinds
    for name, tensor in teacher.state_dict().items():
        if name in student.state_dict() and ".mixer." not in name:
            assert torch.equal(student.state_dict()[name], tensor), name
    _assert_lowered(train(config)["losses"])
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        build_dataset(config.data, vocab_size=64, processor=None)
    with pytest.raises(ValueError, match="seq_len"):
        build_dataset(config.data.model_copy(update={"task": {"seq_lenn": 16}}), vocab_size=256, processor=None)


def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path):
    config = _config(tmp_path, steps=4, checkpoint_every=2)
    train(config)
    newest = config.out_dir / "checkpoints" / "step_000004"
    (newest / "trainer.pt").write_bytes(b"\x00" * 100)  # a torn or overwritten file
    with pytest.warns(UserWarning, match=r"skipped checkpoint .*step_000004: trainer.pt does not match its digest"):
        summary = train(config.model_copy(update={"steps": 6}))
    assert summary["start_step"] == 2 and len(summary["losses"]) == 4


def _flip_bytes_inside(path: Path) -> None:
    """Corrupt a file the way a bad disk does: a few bytes in the middle change, the size does not."""
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 2, len(data) // 2 + 8):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_checkpoint_whose_bytes_changed_is_caught_by_its_digest(tmp_path):
    """Flipped bytes inside trainer.pt load fine with torch; the digest written with the checkpoint
    catches them, and training resumes from the older intact one."""
    config = _config(tmp_path, steps=4, checkpoint_every=2)
    train(config)
    newest = config.out_dir / "checkpoints" / "step_000004"
    assert set(json.loads((newest / "digests.json").read_text())) == {"trainer.pt"}
    _flip_bytes_inside(newest / "trainer.pt")
    with pytest.warns(UserWarning, match=r"step_000004: trainer.pt does not match its digest"):
        summary = train(config.model_copy(update={"steps": 6}))
    assert summary["start_step"] == 2


def test_with_every_checkpoint_damaged_training_stops_unless_told_to_restart(tmp_path):
    config = _config(tmp_path, steps=4, checkpoint_every=2)
    train(config)
    for checkpoint in (config.out_dir / "checkpoints").glob("step_*"):
        _flip_bytes_inside(checkpoint / "trainer.pt")
    (config.out_dir / "checkpoints" / ".staging-left-by-a-crash").mkdir()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every checkpoint is damaged .*restart_if_damaged"):
        train(config.model_copy(update={"steps": 6}))
    assert not list((config.out_dir / "checkpoints").glob(".staging-*")), "a crash's staging folder is removed"
    with pytest.warns(UserWarning, match="restarting from step 0"):
        summary = train(config.model_copy(update={"steps": 6, "restart_if_damaged": True}))
    assert summary["start_step"] == 0


def test_rerunning_a_finished_stage_reports_it_without_a_nan_loss(tmp_path, capsys):
    from mixerzoo.cli import main

    path = _write_yaml(tmp_path / "sft.yaml", _config(tmp_path, steps=2))
    main(["sft", str(path)])
    first = capsys.readouterr().out
    assert "sft: steps 0..2, final loss " in first and "1 thread(s)" in first
    main(["sft", str(path)])
    again = capsys.readouterr().out
    final = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "already trained to step 2, nothing to do" in again and f"final loss {final['loss']:.4f}" in again, again
    assert "nan" not in again and final["threads"] == 1
