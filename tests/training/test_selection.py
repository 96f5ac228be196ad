"""The selection rule: a constant classifier never wins while a real one exists; ties; and an
all-degenerate history is chosen from but reported as degenerate."""

from __future__ import annotations

from histoshield.config import TrainConfig
from histoshield.training.selection import select
from histoshield.training.state import RunState, stop_reason

CONSTANT = "the model predicts malignant for 100% of the images"


def _row(epoch, bal, loss=0.5, robust=None, bal_robust=None, degenerate=None, acc=None):
    return {
        "epoch": epoch,
        "val_loss": loss,
        "val_acc": acc if acc is not None else bal,
        "val_bal_acc": bal,
        "val_robust_acc": robust,
        "val_bal_robust_acc": bal_robust,
        "val_degenerate": degenerate,
    }


def test_constant_classifier_never_wins_clean_selection():
    # Epoch 2 is "always malignant": highest plain accuracy (the malignant share), lowest loss.
    history = [
        _row(1, bal=0.70, acc=0.66, loss=0.60),
        _row(2, bal=0.50, acc=0.76, loss=0.40, degenerate=CONSTANT),
        _row(3, bal=0.74, acc=0.70, loss=0.55),
        _row(4, bal=0.50, acc=0.76, loss=0.35, degenerate=CONSTANT),
    ]
    sel = select(history, adversarial=False)
    assert (sel.epoch, sel.metric, sel.value) == (3, "val_bal_acc", 0.74)
    assert not sel.degenerate and sel.reason is None


def test_constant_classifier_never_wins_adversarial_selection():
    # The constant epoch is "100% robust" on the malignant majority: robust acc 0.76, the best.
    history = [
        _row(1, bal=0.80, robust=0.30, bal_robust=0.35),
        _row(2, bal=0.50, robust=0.76, bal_robust=0.50, degenerate=CONSTANT),
        _row(3, bal=0.72, robust=0.40, bal_robust=0.45),
    ]
    sel = select(history, adversarial=True)
    assert (sel.epoch, sel.metric) == (3, "val_bal_robust_acc")
    assert sel.value == 0.45 and not sel.degenerate


def test_ties_break_on_clean_balanced_accuracy_then_loss_then_earlier_epoch():
    history = [
        _row(1, bal=0.70, bal_robust=0.40, loss=0.5),
        _row(2, bal=0.75, bal_robust=0.40, loss=0.9),  # same robust, better clean: wins
        _row(3, bal=0.75, bal_robust=0.40, loss=0.9),  # exact tie with 2: the earlier stays
        _row(4, bal=0.90, bal_robust=0.39, loss=0.1),
    ]
    assert select(history, adversarial=True).epoch == 2
    clean = [_row(1, bal=0.8, loss=0.6), _row(2, bal=0.8, loss=0.4), _row(3, bal=0.8, loss=0.4)]
    assert select(clean, adversarial=False).epoch == 2


def test_all_degenerate_is_reported():
    history = [
        _row(1, bal=0.50, bal_robust=0.50, degenerate=CONSTANT),
        _row(2, bal=0.55, bal_robust=0.52, degenerate="balanced accuracy is 0.550"),
    ]
    sel = select(history, adversarial=True)
    assert sel.epoch == 2 and sel.degenerate and sel.reason == "balanced accuracy is 0.550"
    assert sel.as_dict()["degenerate"] is True
    assert select([], adversarial=False) is None


def test_missing_or_nan_metrics_rank_last():
    history = [_row(1, bal=float("nan")), _row(2, bal=0.6, loss=None), _row(3, bal=0.6)]
    assert select(history, adversarial=False).epoch == 3


def test_collapse_patience_stops_only_after_a_non_degenerate_epoch():
    cfg = TrainConfig(collapse_patience=2)
    state = RunState(
        history=[_row(1, bal=0.5, degenerate=CONSTANT), _row(2, bal=0.5, degenerate=CONSTANT)]
    )
    assert stop_reason(state, select(state.history, False), cfg, False) is None  # never trained
    state = RunState(history=[_row(1, bal=0.8), _row(2, bal=0.5, degenerate=CONSTANT)])
    assert stop_reason(state, select(state.history, False), cfg, False) is None  # only one
    state.history.append(_row(3, bal=0.5, degenerate=CONSTANT))
    reason = stop_reason(state, select(state.history, False), cfg, False)
    assert reason is not None and "collapse" in reason
    off = TrainConfig()  # collapse_patience=None: warn only
    assert stop_reason(state, select(state.history, False), off, False) is None


def test_robust_collapse_and_early_stopping_from_history():
    cfg = TrainConfig(early_stopping=2)
    rows = [_row(1, bal=0.8, bal_robust=0.6), _row(2, bal=0.8, bal_robust=0.35)]
    state = RunState(history=rows)
    reason = stop_reason(state, select(rows, True), cfg, True)
    assert reason is not None and "catastrophic overfitting" in reason
    assert stop_reason(state, select(rows, True), cfg, False) is None  # watch off, patience 1
    rows.append(_row(3, bal=0.8, bal_robust=0.5))
    assert "early stopping" in stop_reason(state, select(rows, True), cfg, False)


def test_validation_curves_figure(tmp_path):
    from histoshield.report.figures import validation_curves

    runs = {
        "before": [_row(1, bal=0.8, bal_robust=0.4), _row(2, bal=0.5, bal_robust=0.5,
                                                           degenerate=CONSTANT)],
        "after": [_row(1, bal=0.8, bal_robust=""), _row(2, bal=0.85, bal_robust=0.6)],
    }  # fmt: skip
    out = validation_curves(runs, tmp_path / "curves.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_constant_predictions_under_attack_never_win_adversarial_selection():
    # Epoch 2 calls every attacked tile benign: all benign tiles "robust", no malignant one, so
    # balanced robust accuracy 0.5 beats epoch 1's real 0.30; it must not be chosen.
    under_attack = "under attack the model predicts benign for 100% of the images"
    history = [
        _row(1, bal=0.80, robust=0.30, bal_robust=0.30),
        {**_row(2, bal=0.85, robust=0.14, bal_robust=0.50), "val_robust_degenerate": under_attack},
    ]
    sel = select(history, adversarial=True)
    assert sel.epoch == 1 and sel.value == 0.30
    # from metrics.csv (resume) an absent reason is "": it does not demote the epoch
    history[1]["val_robust_degenerate"] = ""
    assert select(history, adversarial=True).epoch == 2
