"""The mixture replayed offline serves what the service's mixture served from its candidates."""

from __future__ import annotations

import numpy as np
import pytest

from bench.mixture_replay import (
    Recorded,
    build,
    collect,
    parse_variant,
    replay,
    score,
    served_score,
    table,
)


@pytest.fixture(scope="module")
def phishing_late(tmp_path_factory) -> Recorded:
    recorded = collect("phishing", runs=None, delay=20, max_rows=300)
    folder = tmp_path_factory.mktemp("runs")
    return Recorded.load(recorded.save(folder))


def test_the_recording_keeps_every_label_in_order_with_each_candidates_output(phishing_late):
    # 240 samples served, the last 20 labels never back
    assert len(phishing_late.labels) == len(phishing_late.served) == 220
    assert set(phishing_late.candidates) == {"newest_label", "learner.hat", "learner.ht",
                                             "adapted"}
    assert all(v.shape == (220, 2) for v in phishing_late.candidates.values())
    assert phishing_late.built["probation"] == ["newest_label"]
    assert phishing_late.built["eta"] == [2.0, 0.1]


def test_the_replay_of_the_services_settings_serves_what_the_service_served(phishing_late):
    replayed = replay(phishing_late, {})
    assert np.array_equal(replayed.argmax(1), phishing_late.served.astype(int))
    assert score(phishing_late, replayed) == served_score(phishing_late)


def test_a_variant_changes_only_the_arguments_it_names(phishing_late):
    variant = parse_variant("first_share=0.5 eta=1,0.05 probation=off")
    assert variant == {"first_share": 0.5, "eta": [1.0, 0.05], "probation": "off"}
    mixture = build(phishing_late, variant)
    assert mixture.etas == [1.0, 0.05] and mixture.rate_share.tolist() == [0.5, 0.5]
    assert mixture.probation == () and mixture.share == build(phishing_late, {}).share
    assert build(phishing_late, {}).probation == ("newest_label",)


def test_the_table_gives_each_variant_against_the_replay_and_the_best_candidate(phishing_late):
    text = table([phishing_late], ["first_share=0.5"])
    row = next(line for line in text.splitlines() if line.startswith("| phishing-20 |"))
    served = f"{100 * served_score(phishing_late):.2f}"
    assert row.split(" | ")[1:3] == [served, served]  # the replay serves what was served
    assert "first_share=0.5: better on" in text and "replayed " in text
