"""The B6 runner on a tiny real stream: what the service, River and the no-change baseline score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.real_streams import (
    CONFIGS,
    DRIFT_PAIRS,
    load_stream,
    no_change,
    report,
    run_stream,
    train_model,
)


def test_the_no_change_baseline_predicts_the_newest_label_back_when_the_request_is_made():
    y_train, y = np.array([9]), np.arange(10)
    # one sample per request, labels at once: the previous sample's label
    assert no_change(y_train, y, delay=0, request=1).tolist() == [9, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    # requests of 4, labels 2 late: the request at 4 has the labels of samples 0 and 1 back
    assert no_change(y_train, y, delay=2, request=4).tolist() == [9, 9, 9, 9, 1, 1, 1, 1, 5, 5]
    # no label back within the stream: the last training label throughout
    assert no_change(y_train, y, delay=10, request=1).tolist() == [9] * 10


def test_only_the_defaults_and_the_mixture_columns_serve_the_mixture_or_its_learner():
    from bench.real_streams import TabularMLP, factory_name
    from service.model import load_model
    from service.runtime import resolve_auto
    from service.settings import load_settings

    data = load_stream("phishing", max_rows=100, train_share=0.2)
    model = {"factory": factory_name(data.x.shape[1], data.outputs), "task": data.task,
             "input_shape": [data.x.shape[1]], "name": "phishing-mlp", "num_classes": 2}
    loaded = load_model(load_settings(None, model=model).model)
    assert isinstance(loaded.module, TabularMLP)
    learners = {}
    for name, config in CONFIGS.items():
        settings = resolve_auto(load_settings(None, model=model, **config.settings(data)), loaded)
        learners[name] = (settings.mixture.enabled, settings.mixture.learners)
    both = (True, ("hat", "ht"))  # River's two Hoeffding trees, each a candidate
    assert learners.pop("defaults") == learners.pop("defaults-nodrift") == both
    assert learners.pop("defaults+sup-all") == learners.pop("defaults+sup-all-nodrift") == both
    assert learners.pop("defaults+sup-all-avg") == both
    for variant in ("trim", "confirm", "noact", "lfonly"):  # the recipe under drift policies
        assert learners.pop(f"defaults+sup-all-{variant}") == both
    assert learners.pop("defaults+newest") == learners.pop("defaults-newest") == both
    assert learners.pop("defaults+arf") == (True, ("hat", "ht", "arf"))
    assert learners.pop("defaults+ht") == (True, ("ht",))
    assert learners.pop("mix+hat") == (True, ("hat",))
    assert learners.pop("mix+arf") == learners.pop("mix+arf+sup-all") == (True, ("arf",))
    for name in ("mix", "mem+sup+mix", "bn+mem+sup+mix"):
        assert learners.pop(name) == (True, ())
    assert set(learners.values()) == {(False, ())}  # every other column measures its parts


def test_the_recipes_drift_variants_differ_from_it_in_the_drift_policy_alone():
    from service.settings import load_settings

    data = load_stream("phishing", max_rows=100, train_share=0.2)
    model = {"task": data.task, "input_shape": [data.x.shape[1]], "num_classes": 2}

    def built(name):
        return load_settings(None, model=model, **CONFIGS[name].settings(data)).model_dump()

    recipe = built("defaults+sup-all")
    assert recipe["drift"]["enabled"] and recipe["supervised"]["train"] == "all"
    policies = {"trim": {"labelled_actions": ["trim_memory"]},
                "confirm": {"confirmation": "labelled"},
                "noact": {"label_free_actions": [], "labelled_actions": []},
                "lfonly": {"labelled_actions": []}}
    for variant, changed in policies.items():
        settings = built(f"defaults+sup-all-{variant}")
        assert {k: v for k, v in settings.items() if k != "drift"} == \
            {k: v for k, v in recipe.items() if k != "drift"}
        policy = recipe["drift"]["policy"] | changed
        assert settings["drift"] == recipe["drift"] | {"policy": policy}, variant
    assert ("defaults+sup-all-trim", "defaults+sup-all-nodrift") in DRIFT_PAIRS


def test_a_real_stream_keeps_its_order_and_trains_on_its_first_slice():
    data = load_stream("phishing", max_rows=400, train_share=0.2)
    assert (len(data.x_train), len(data.x), data.classes) == (80, 320, 2)
    assert data.x.shape[1] == 9 and data.drift_at is None
    # River's Phishing opens with four phishing pages
    assert data.y_train[:4].tolist() == [1, 1, 1, 1]


@pytest.fixture(scope="module")
def tiny_phishing():
    data = load_stream("phishing", max_rows=400, train_share=0.2)
    configs = [CONFIGS["source"], CONFIGS["memory"]]
    return data, run_stream(data, configs, learners=["HT"], delays=[0])


@pytest.mark.slow
def test_every_learner_scores_the_same_rows_with_accuracies_that_are_rates(tiny_phishing):
    data, results = tiny_phishing
    assert [r.learner for r in results] == ["source", "memory", "HT", "no-change"]
    for r in results:
        assert (r.samples, r.delay, r.task) == (320, 0, "classification")
        assert 0.0 <= r.score <= 1.0 and 0.0 <= r.last_half <= 1.0
        assert r.ms_per_sample >= 0.0 and r.unjoined_labels == 0
    assert results[0].score > 0.6  # a trained model, not a coin


@pytest.mark.slow
def test_the_source_configuration_serves_the_trained_model_unchanged(tiny_phishing):
    data, results = tiny_phishing
    model = train_model(data)  # seeded: the same weights the service loaded
    with torch.no_grad():
        offline = model(torch.from_numpy(data.x)).argmax(1).numpy()
    source = results[0]
    assert source.score == pytest.approx(float((offline == data.y).mean()))
    # nothing learns and nothing watches: no alarms, no guard
    assert source.label_free_per_10k is None and source.labelled_alarms == 0
    assert source.collapse_resets == source.shadow_resets == 0


@pytest.mark.slow
def test_the_no_change_row_is_the_newest_label_of_the_previous_request(tiny_phishing):
    data, results = tiny_phishing
    # 16 samples per request, labels at once: a request repeats the label its predecessor ended on
    expected = [data.y_train[-1] if j < 16 else data.y[j // 16 * 16 - 1] for j in range(320)]
    assert results[-1].score == pytest.approx(float(np.mean(np.asarray(expected) == data.y)))
    # from the first label on: the first request, served before any label was back, left out
    right = np.asarray(expected)[16:] == data.y[16:]
    assert results[-1].after_first_label == pytest.approx(float(right.mean()))
    assert all(r.after_first_label is not None for r in results)


def test_every_learner_is_scored_from_the_request_after_the_first_label_back():
    from bench.real_streams import first_taught

    # labels 100 late, requests of 16: the request ending at 112 sends label 0 back
    assert first_taught(1000, 100, request=16) == 112
    assert first_taught(10, 100, request=16) == 10  # no label back within the stream


@pytest.mark.parametrize("labels", ["every", "share", "exponential"])
def test_the_first_sample_taught_is_where_a_prequential_loop_first_has_a_label(labels):
    from bench.drift_streams import label_batches
    from bench.real_streams import Labels, first_taught

    schedule = {"every": Labels(), "share": Labels(fraction=0.05),
                "exponential": Labels(spread="exponential")}[labels]
    for samples, delay, request in [(300, 0, 16), (300, 40, 16), (1000, 100, 7), (50, 30, 1)]:
        batches = label_batches(samples, request, schedule.due(samples, delay))
        learnt, first = 0, samples
        for start, batch in zip(range(0, samples, request), batches, strict=True):
            if learnt:  # this request is served knowing a label
                first = start
                break
            learnt += len(batch)
        assert first_taught(samples, delay, request, schedule) == first


def test_the_leads_table_compares_the_field_asked_and_leaves_the_last_half_alone():
    from bench.real_streams import Result, verdict_table

    def result(learner: str, kind: str, score: float, last_half: float,
               after: float | None) -> Result:
        return Result("s", learner, kind, "regression", 0, 100, score, last_half, 0.1, after)

    def rows(after: dict[str, float | None]) -> list[Result]:
        return [result("source", "adaptd", 2.0, 2.0, after["source"]),
                result("defaults", "adaptd", 1.0, 1.5, after["defaults"]),
                result("HT", "river", 1.2, 1.0, after["HT"]),
                result("no-change", "baseline", 0.9, 1.0, after["no-change"])]

    scores = {"source": 1.9, "defaults": 0.5, "HT": 1.0, "no-change": 0.6}
    by_score = verdict_table(rows(scores), "regression", 0).splitlines()[2].split(" | ")
    by_first = verdict_table(rows(scores), "regression", 0,
                             "after_first_label").splitlines()[2].split(" | ")
    # defaults − HT and − no-change: MAE lower by, over the stream or from the first label on
    assert by_score[1:3] == ["+0.2", "-0.1"]
    assert by_first[1:3] == ["+0.5", "+0.1"]
    assert by_score[4] == by_first[4] == "+0.5 (defaults)"  # the last half's, either way
    unscored = verdict_table(rows(dict.fromkeys(scores)), "regression", 0,
                             "after_first_label").splitlines()[2].split(" | ")
    assert unscored[1:4] == ["", "", ""] and unscored[4] == "+0.5 (defaults)"


@pytest.mark.slow
def test_the_report_prints_each_learners_accuracy_in_percent(tiny_phishing):
    _, results = tiny_phishing
    table = report(results)
    assert "| stream | source | memory | HT | no-change |" in table
    source = results[0]
    assert f"| phishing | {100 * source.score:.1f} ({100 * source.last_half:.1f}) |" in table


def test_the_growth_table_follows_the_learner_label_by_label():
    from bench.real_streams import growth_table, learner_growth

    rows = learner_growth("sea", "ht", 2_000, chunk=1_000)
    assert [r["labels"] for r in rows] == [1_000, 2_000]
    assert all(r["nodes"] >= 1 and r["megabytes"] > 0 and r["learn_ms"] > 0 for r in rows)
    assert growth_table(rows).count("| sea | ht |") == 2


@pytest.mark.slow
def test_half_the_labels_at_random_delays_reach_the_service_river_and_the_baseline_alike(
        monkeypatch):
    from bench import real_streams
    from bench.drift_streams import label_batches
    from bench.real_streams import Labels, _river_rows, run_river, run_service, trained

    data = load_stream("phishing", max_rows=400, train_share=0.2)
    labels = Labels(fraction=0.5, spread="exponential")
    due = labels.due(len(data.x), 20)
    batches = label_batches(len(data.x), 16, due)
    sent = np.concatenate(batches).astype(int)
    # about half the labels, each once, never before its sample was served
    assert 120 < len(sent) < 200 and len(set(sent.tolist())) == len(sent)
    assert all(i < 16 * (k + 1) for k, batch in enumerate(batches) for i in batch)
    assert np.isfinite(due).sum() > len(sent)  # some are due after the stream ends

    # River learns those labels after its training slice, in that order
    learnt = []

    class Recorder:
        def learn_one(self, x, y):
            learnt.append((x, y))

        def predict_one(self, x):
            return 0

    monkeypatch.setattr(real_streams, "_river_learners", lambda task: {"HT": Recorder})
    run_river(data, "HT", 20, labels=labels)
    _, rows = _river_rows(data)
    assert learnt[len(data.x_train):] == [(rows[i], int(data.y[i])) for i in sent]

    # the service joins exactly as many
    served = []
    serve = real_streams.serve_prequential

    async def recording(*args, **kwargs):
        served.append(await serve(*args, **kwargs))
        return served[-1]

    monkeypatch.setattr(real_streams, "serve_prequential", recording)
    with trained(data) as (weights, reference):
        result = run_service(data, CONFIGS["source"], weights, reference, 20, labels=labels)
    assert result.unjoined_labels == 0
    assert served[0].metrics['adaptd_labels_total{outcome="joined"}'] == len(sent)

    # the baseline repeats the last label of the previous batch that brought any
    baseline = no_change(data.y_train, data.y, 20, labels=labels)
    newest = data.y_train[-1]
    for k, batch in enumerate(batches):
        assert (baseline[16 * k:16 * (k + 1)] == newest).all()
        newest = data.y[batch[-1]] if len(batch) else newest
