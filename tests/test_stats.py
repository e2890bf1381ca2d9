"""vesselnb.stats against scipy / statsmodels on synthetic clustered data with a known truth.

The data mimic the users': patients → sequences → frames, with a patient effect much larger than the frame noise, so
frames of one patient are strongly correlated. Rates over seeds are checked with binomial margins, never exact values.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

from vesselnb import stats

N_PATIENTS, N_SEQUENCES, N_FRAMES = 12, 2, 4


def clustered(seed: int, mean: float = 0.6, patient_sd: float = 0.08, sequence_sd: float = 0.03,
              frame_sd: float = 0.01, n_patients: int = N_PATIENTS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, patients, sequences): ``mean`` + patient effect + sequence effect + frame noise."""
    rng = np.random.default_rng(seed)
    values, patients, sequences = [], [], []
    for p in range(n_patients):
        patient_effect = rng.normal(0, patient_sd)
        for s in range(N_SEQUENCES):
            sequence_effect = rng.normal(0, sequence_sd)
            for _ in range(N_FRAMES):
                values.append(mean + patient_effect + sequence_effect + rng.normal(0, frame_sd))
                patients.append(f"P{p:02d}")
                sequences.append(f"S{s}")
    return np.array(values), np.array(patients), np.array(sequences)


def test_balanced_cluster_bootstrap_is_scipys_bootstrap_of_patient_means() -> None:
    values, patients, sequences = clustered(seed=1)
    ours = stats.patient_bootstrap_ci(values, patients, sequences, n_resamples=2000, seed=7, method="percentile")
    means = np.array([values[patients == p].mean() for p in np.unique(patients)])
    reference = scipy_stats.bootstrap((means,), np.mean, n_resamples=2000, method="percentile",
                                      rng=np.random.default_rng(7)).confidence_interval
    assert ours.low == pytest.approx(reference.low, rel=1e-9)
    assert ours.high == pytest.approx(reference.high, rel=1e-9)
    assert ours.estimate == pytest.approx(values.mean())
    assert ours.counts == stats.Counts(N_PATIENTS, N_PATIENTS * N_SEQUENCES, len(values))
    assert "12 patients · 24 sequences · 96 frames" in ours.text()


def test_the_interval_does_not_shrink_when_each_patient_has_more_frames() -> None:
    rng = np.random.default_rng(0)
    per_patient = rng.random(12)
    names = np.array([f"p{i}" for i in range(12)])
    one = stats.patient_bootstrap_ci(per_patient, names, n_resamples=2000)
    many = stats.patient_bootstrap_ci(np.repeat(per_patient, 50), np.repeat(names, 50), n_resamples=2000)
    assert many.high - many.low == pytest.approx(one.high - one.low, rel=1e-6)
    assert one.low < per_patient.mean() < one.high


def test_patient_intervals_cover_the_true_mean_and_frame_intervals_do_not() -> None:
    """Over seeds, the 95 % patient interval covers the true mean about 95 % of the time; resampling frames as if
    they were independent gives intervals far too narrow (the failure this module exists to avoid)."""
    truth, seeds = 0.6, range(200)
    covered = frame_covered = 0
    for seed in seeds:
        values, patients, sequences = clustered(seed, mean=truth)
        interval = stats.patient_bootstrap_ci(values, patients, sequences, n_resamples=500, seed=seed)
        covered += interval.low <= truth <= interval.high
        naive = scipy_stats.bootstrap((values,), np.mean, n_resamples=500, method="percentile",
                                      rng=np.random.default_rng(seed)).confidence_interval
        frame_covered += naive.low <= truth <= naive.high
    rate, frame_rate = covered / len(seeds), frame_covered / len(seeds)
    assert 0.86 <= rate <= 0.99, rate  # nominal 0.95; 12 clusters make bootstrap intervals slightly liberal
    assert frame_rate < 0.6, frame_rate


def test_no_interval_below_the_minimum_of_patients_and_the_reason_is_given() -> None:
    values, patients, sequences = clustered(seed=2, n_patients=9)
    below = stats.patient_bootstrap_ci(values, patients, sequences)
    assert not below.shown and math.isnan(below.low) and below.withheld == "only 9 patients (a CI needs at least 10)"
    assert below.estimate == pytest.approx(values.mean()) and below.counts.n_patients == 9
    assert "no CI: only 9 patients" in below.text() and below.as_dict()["low"] is None
    values, patients, sequences = clustered(seed=2, n_patients=10)
    assert stats.patient_bootstrap_ci(values, patients, sequences).shown
    assert stats.patient_bootstrap_ci(values, patients, sequences, min_patients=11).withheld
    nothing = stats.patient_bootstrap_ci([math.nan, math.inf], ["a", "b"])
    assert nothing.withheld == "no finite values" and not nothing.shown


def test_patient_level_tests_match_scipy() -> None:
    values, patients, _ = clustered(seed=3)
    deltas = values - 0.58
    means = np.array([deltas[patients == p].mean() for p in np.unique(patients)])
    p_ours, _ = stats.paired_patient_p(means)
    assert p_ours == pytest.approx(scipy_stats.wilcoxon(means, zero_method="pratt").pvalue)
    p_perm, note = stats.paired_patient_p(means, "permutation")
    exact = scipy_stats.permutation_test((means,), np.mean, permutation_type="samples", n_resamples=np.inf)
    assert p_perm == pytest.approx(exact.pvalue) and note == ""
    assert stats.paired_patient_p(np.zeros(5)) == (1.0, "all 5 patient differences are zero: p set to 1")
    assert math.isnan(stats.paired_patient_p([math.nan])[0])


def test_holm_is_statsmodels_and_leaves_nan_out_of_the_family() -> None:
    p_values = {"dice": 0.004, "cldice": 0.03, "hd95": 0.02, "nsd": math.nan, "iou": 0.5}
    adjusted = stats.holm(p_values)
    finite = [k for k in p_values if not math.isnan(p_values[k])]
    reference = multipletests([p_values[k] for k in finite], method="holm")[1]
    assert [adjusted[k] for k in finite] == pytest.approx(list(reference))
    assert math.isnan(adjusted["nsd"])
    assert adjusted["dice"] == pytest.approx(0.016)  # 4 finite p-values: the smallest times 4


def _paired(seed: int, effect: float, test: stats.PairedTest = "wilcoxon") -> tuple[stats.PairedMetric, float]:
    """Run B = run A + ``effect`` + a patient-level perturbation; also the frame-level Wilcoxon p for contrast."""
    values, patients, sequences = clustered(seed)
    rng = np.random.default_rng(seed + 10_000)
    patient_shift = {p: rng.normal(0, 0.02) for p in np.unique(patients)}
    b = values + effect + np.array([patient_shift[p] for p in patients]) + rng.normal(0, 0.002, len(values))
    result = stats.paired_metric("dice", values, b, patients, sequences, test=test, n_resamples=300, seed=seed)
    return result, float(scipy_stats.wilcoxon(b - values).pvalue)


@pytest.mark.parametrize("test", ["wilcoxon", "permutation"])
def test_a_true_zero_effect_gives_the_nominal_false_positive_rate(test: stats.PairedTest) -> None:
    seeds = range(300)
    rejections = frame_rejections = covered = 0
    for seed in seeds:
        result, frame_p = _paired(seed, effect=0.0, test=test)
        rejections += result.p_value < 0.05
        frame_rejections += frame_p < 0.05
        covered += result.delta.low <= 0 <= result.delta.high
    # 300 seeds at a true rate of 0.05: the binomial 99.9 % range is about [0.015, 0.10]
    assert rejections / len(seeds) <= 0.10, rejections
    assert frame_rejections / len(seeds) > 0.3, frame_rejections  # frames as independent: many false findings
    assert covered / len(seeds) >= 0.85, covered


def test_a_true_effect_is_found() -> None:
    found = 0
    for seed in range(50):
        result, _ = _paired(seed, effect=0.03)
        table = stats.paired_table([result])
        found += bool(table.loc["dice", "significant"]) and table.loc["dice", "direction"] == "better"
        assert result.delta.estimate == pytest.approx(result.mean_b - result.mean_a)
    assert found >= 45, found


def test_the_paired_table_names_what_got_worse_after_holm() -> None:
    values, patients, sequences = clustered(seed=4)
    rng = np.random.default_rng(4)
    better = stats.paired_metric("dice", values, values + 0.05 + rng.normal(0, 0.005, 96), patients, sequences)
    fragments_a = rng.poisson(4, 96).astype(float)
    worse = stats.paired_metric("betti0_error", fragments_a, fragments_a + 6 + rng.poisson(1, 96), patients, sequences,
                                higher_is_better=False)
    noise = stats.paired_metric("nsd", values, values + rng.normal(0, 0.01, 96), patients, sequences)
    table = stats.paired_table([better, worse, noise])
    assert table.loc["dice", "direction"] == "better" and table.loc["betti0_error", "direction"] == "worse"
    assert table.loc["nsd", "direction"] == "—"
    assert (table["p_holm"] >= table["p"]).all()
    assert table.loc["betti0_error", "patients_worse"] == 12 and table.loc["betti0_error", "frames_worse"] == 96


def test_the_cv_threshold_never_sees_the_held_out_patient() -> None:
    thresholds = np.round(np.arange(0.1, 0.91, 0.1), 2)
    rng = np.random.default_rng(5)
    patients = np.repeat([f"P{i}" for i in range(6)], 4)
    peak = np.where(np.isin(patients, ["P0", "P1", "P2"]), 0.3, 0.6)  # two groups of patients, two optima
    scores = 1 - (thresholds[None, :] - peak[:, None]) ** 2 + rng.normal(0, 0.001, (24, len(thresholds)))
    choice = stats.cv_threshold(scores, patients, thresholds)
    assert choice is not None and list(choice.folds["patient"]) == [f"P{i}" for i in range(6)]
    changed = scores.copy()
    changed[patients == "P0"] = 0.0
    changed[patients == "P0", 0] = 5.0  # the held-out patient screams for threshold 0.1
    again = stats.cv_threshold(changed, patients, thresholds)
    fold = again.folds.set_index("patient")
    assert fold.loc["P0", "threshold"] == choice.folds.set_index("patient").loc["P0", "threshold"]
    assert fold.loc["P0", "score"] == pytest.approx(0.0)  # scored on its own (changed) frames only
    assert (fold.drop("P0")["threshold"] == 0.1).all()  # every other fold does see P0 and follows it
    assert again.in_sample_best == 0.1 and again.out_of_fold < again.in_sample_score  # in-sample is optimistic
    assert stats.cv_threshold(scores[:4], patients[:4], thresholds) is None  # one patient: nothing to hold out


def test_dice_from_sweep_counts() -> None:
    counts = np.array([[[5, 5, 0], [0, 0, 0]], [[0, 3, 4], [2, 0, 2]]])
    dice = stats.dice_from_sweep(counts)
    assert dice[0, 0] == pytest.approx(10 / 15) and math.isnan(dice[0, 1])
    assert dice[1, 0] == 0 and dice[1, 1] == pytest.approx(4 / 6)
