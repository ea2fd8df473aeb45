"""method=auto: candidates on one split, the cheapest within the noise of the best wins, the leaderboard is recorded."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from upt.artifact import CONFIG_FILE, load_artifact
from upt.auto import (
    DEFAULT_CANDIDATES,
    AutoConfig,
    LeaderboardRow,
    base_config,
    candidate_config,
    config_from_dict,
    parse_candidates,
    pick_winner,
    train_auto,
)
from upt.errors import ConfigError
from upt.training import TrainConfig


def _row(method: str, accuracy: float | None, parameters: int, correct: list[int] | None = None) -> LeaderboardRow:
    return LeaderboardRow(method, accuracy, 8, {}, parameters, 1.0, correct)


def _scored(method: str, parameters: int, *hits: int) -> LeaderboardRow:
    return _row(method, sum(hits) / len(hits), parameters, list(hits))


def test_a_costlier_candidate_must_win_by_more_than_one_paired_standard_error():
    cheap = _scored("tip-adapter", 0, 1, 1, 1, 1, 1, 1, 0, 0)
    # one more image right, nothing else different: d = (0,…,0,1), gap 1/8, SE √(1/8 · 7/8 · 8/7) / √8 = 1/8
    close = _scored("coop", 256, 1, 1, 1, 1, 1, 1, 1, 0)
    assert pick_winner([close, cheap]).method == "tip-adapter"
    far = _scored("upt", 5000, 1, 1, 1, 1, 1, 1, 1, 1)  # two more right: gap 2/8 > SE ≈ 0.16
    assert pick_winner([cheap, far]).method == "upt"
    # the same two-image gap, right on the same images (SE ≈ 0.16) or on other ones (SE ≈ 0.31)
    half = _scored("zero-shot", 0, 1, 1, 1, 1, 0, 0, 0, 0)
    assert pick_winner([half, _scored("coop", 256, 1, 1, 1, 1, 1, 1, 0, 0)]).method == "coop"
    assert pick_winner([half, _scored("coop", 256, 0, 0, 1, 1, 1, 1, 1, 1)]).method == "zero-shot"
    assert pick_winner([_row("a", 0.5, 10), _row("b", 0.5, 10)]).method == "a"  # full tie: candidate order
    with pytest.raises(ConfigError):
        pick_winner([])


def test_no_validation_image_is_no_evidence_the_cheapest_candidate_stays():
    rows = [_row("upt", None, 5000), _row("coop", None, 256), _row("tip-adapter", None, 0)]
    assert pick_winner(rows).method == "tip-adapter"


def _rule(board: list[dict]) -> str:
    """The rule of upt.auto.RULE, written out: the cheapest candidate not worse than the best by more than
    one standard error of their paired difference."""
    best = max(board, key=lambda row: row["val_accuracy"])
    for row in sorted(board, key=lambda row: row["trainable_parameters"]):
        d = [a - b for a, b in zip(best["val_correct"], row["val_correct"])]
        mean = sum(d) / len(d)
        stderr = (sum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d)) ** 0.5
        if best["val_accuracy"] - row["val_accuracy"] <= stderr:
            return row["method"]
    return best["method"]


def test_candidates_are_checked_and_keep_their_own_recipe():
    assert parse_candidates(None) == DEFAULT_CANDIDATES == ("gda", "tip-adapter-f", "coop", "vpt-deep", "upt")
    assert parse_candidates("coop, upt") == ("coop", "upt")
    for bad in ("coop,nope", "coop,coop"):
        with pytest.raises(ConfigError):
            parse_candidates(bad)
    base = TrainConfig.of("coop", shots=4, seed=3, epochs=2, lr=0.05, batch_size=8)
    tip = candidate_config(base, "tip-adapter-f")
    assert (tip.shots, tip.seed, tip.step_lr, tip.step_batch_size, tip.total_epochs) == (4, 3, 0.002, 32, 20)
    upt = candidate_config(base, "upt")
    assert (upt.method, upt.shots, upt.seed, upt.lr, upt.epochs) == ("upt", 4, 3, 0.05, 2)


def test_auto_keeps_the_winner_of_its_rule(tiny, fashion_train, tmp_path):
    candidates = ("tip-adapter", "coop", "vpt-shallow")
    base = base_config(candidates, shots=4, epochs=2, lr=0.05, batch_size=8, augment_views=2)
    result = train_auto(tiny, fashion_train, base, candidates, tmp_path / "out", tmp_path / "work")
    board = result.choice["leaderboard"]
    assert [row["method"] for row in board] == list(candidates)
    written_rows = [load_artifact(tmp_path / "work" / method).config["metrics"] | {"method": method}
                    for method in candidates]
    for row, written in zip(board, written_rows):
        assert len(written["val_correct"]) == 16 and sum(written["val_correct"]) == round(16 * row["val_accuracy"])
    assert result.choice["winner"] == _rule([row | {"val_correct": written["val_correct"]}
                                             for row, written in zip(board, written_rows)])
    best = {"method": result.choice["winner"]}
    assert result.choice["val_count"] == 16 and {row["val_count"] for row in board} == {16}  # one split
    assert result.choice["rests_on"] == "16 validation images"
    for row in board:
        assert set(row) == {"method", "val_accuracy", "val_count", "per_class_accuracy", "trainable_parameters",
                            "training_seconds", "val_correct", "val_stderr", "gap_to_best", "gap_stderr"}
        assert set(row["per_class_accuracy"]) == {"bag", "pullover", "sneaker", "trouser"}
        assert row["training_seconds"] > 0
        written = load_artifact(tmp_path / "work" / row["method"]).config["metrics"]
        assert written["val_accuracy"] == row["val_accuracy"]
    artifact = load_artifact(result.artifact_dir)  # the winner's, whole and with its tensors' checksums
    assert artifact.config["method"] == best["method"] and artifact.config["auto"] == result.choice


@pytest.mark.slow
def test_cli_auto_prints_the_leaderboard_and_writes_the_winner(tiny_checkpoint, fashion_train, tmp_path):
    command = [sys.executable, "-m", "upt", "train", "--data", str(fashion_train), "--method", "auto",
               "--candidates", "tip-adapter,coop", "--shots", "2", "--epochs", "1", "--model", "upt-tiny",
               "--pretrained", str(tiny_checkpoint), "--out", str(tmp_path / "auto"), "--json", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    board = payload["auto"]["leaderboard"]
    assert payload["method"] == "auto" and payload["winner"] == pick_winner(
        [LeaderboardRow.from_dict(row) for row in board]).method
    assert payload["auto"]["val_count"] == 8
    config = json.loads((tmp_path / "auto" / CONFIG_FILE).read_text())
    assert config["auto"] == payload["auto"] and config["method"] == payload["winner"]
    assert [p.name for p in tmp_path.iterdir()] == ["auto"]  # the candidates' folders are gone


def test_a_resumed_auto_run_keeps_the_candidates_already_trained(tiny, fashion_train, tmp_path):
    base = base_config(("tip-adapter", "coop"), shots=2, epochs=1, lr=0.05, batch_size=4, augment_views=1)
    seen = []
    first = train_auto(tiny, fashion_train, base, ("tip-adapter", "coop"), tmp_path / "a", tmp_path / "work",
                       resume=True, on_candidate=lambda i, row, reused: seen.append((row.method, reused)))
    created = {m: load_artifact(tmp_path / "work" / m).config["created_at"] for m in ("tip-adapter", "coop")}
    second = train_auto(tiny, fashion_train, base, ("tip-adapter", "coop"), tmp_path / "b", tmp_path / "work",
                        resume=True, on_candidate=lambda i, row, reused: seen.append((row.method, reused)))
    assert seen == [("tip-adapter", False), ("coop", False), ("tip-adapter", True), ("coop", True)]
    assert second.choice == first.choice
    assert {m: load_artifact(tmp_path / "work" / m).config["created_at"] for m in created} == created
    other = dataclasses.replace(base, seed=9)  # another run's candidates are trained afresh
    third = train_auto(tiny, fashion_train, other, ("tip-adapter",), tmp_path / "c", tmp_path / "work", resume=True,
                       on_candidate=lambda i, row, reused: seen.append((row.method, reused)))
    assert seen[-1] == ("tip-adapter", False) and third.choice["winner"] == "tip-adapter"


def test_auto_config_round_trips_as_a_task_row_stores_it():
    config = AutoConfig(TrainConfig.of("coop", shots=4, epochs=3, lr=0.05), ("tip-adapter-f", "coop"))
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["method"] == "auto" and stored["candidates"] == ["tip-adapter-f", "coop"]
    again = config_from_dict(stored)
    assert isinstance(again, AutoConfig) and again.candidates == config.candidates
    assert [c.to_dict() for c in again.configs()] == [c.to_dict() for c in config.configs()]
    assert again.total_epochs == 20 + 3
    assert isinstance(config_from_dict(TrainConfig.of("upt").to_dict()), TrainConfig)
