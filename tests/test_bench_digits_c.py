"""B1's traffic axis: the orders of the stream, the overrides, and a tiny grid in process."""

from __future__ import annotations

import numpy as np
import pytest

from bench.digits_c import (
    CLEAN,
    MIXED,
    REPEAT,
    REPEATS,
    SPIKE,
    SPIKE_AT,
    Domain,
    client_requests,
    compare,
    dirichlet_order,
    label_positions,
    main,
    mean_run_length,
    method_settings,
    order_stream,
    parse_order,
    parse_sets,
    run_grid,
    run_in_process,
    sections,
    stream,
    table,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A tiny model on a shared machine: one torch thread is many times faster."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def domains() -> list[Domain]:
    return stream()


def _rows(domain: Domain) -> list[bytes]:
    return sorted(row.tobytes() for row in domain.inputs)


@pytest.mark.parametrize("alpha", ["1", "0.1", "0.01"])
def test_the_dirichlet_order_permutes_each_domain_and_keeps_its_classes(domains, alpha):
    ordered = order_stream(domains, f"dirichlet:{alpha}", seed=7)
    assert [d.name for d in ordered] == [d.name for d in domains]
    for before, after in zip(domains, ordered, strict=True):
        assert np.bincount(after.labels, minlength=10).tolist() == \
            np.bincount(before.labels, minlength=10).tolist()
        assert _rows(after) == _rows(before)  # the same images, each once
        # a sample keeps its label
        pairs = sorted((r.tobytes(), int(y)) for r, y in zip(after.inputs, after.labels,
                                                                strict=True))
        assert pairs == sorted((r.tobytes(), int(y)) for r, y in zip(before.inputs,
                                                                     before.labels, strict=True))
    # the clean domain stays as it was (i.i.d.)
    assert ordered[-1] is domains[-1] and ordered[-1].name == CLEAN


def test_the_dirichlet_order_is_a_permutation_and_is_seeded():
    labels = np.random.default_rng(0).integers(0, 10, 900)
    order = dirichlet_order(labels, 0.1, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(900))
    again = dirichlet_order(labels, 0.1, np.random.default_rng(1))
    assert order.tolist() == again.tolist()


def test_the_order_depends_on_the_seed_and_the_domain_alone(domains):
    one = order_stream(domains, "dirichlet:0.1", seed=3)
    two = order_stream(domains[2:4], "dirichlet:0.1", seed=3)  # other domains around it
    assert one[2].labels.tolist() == two[0].labels.tolist()
    other = order_stream(domains, "dirichlet:0.1", seed=4)
    assert one[2].labels.tolist() != other[2].labels.tolist()


def test_a_small_alpha_makes_long_runs_of_one_class(domains):
    corrupted = [d for d in domains if d.name != CLEAN]
    iid = np.mean([mean_run_length(d.labels) for d in corrupted])
    ordered = [d for d in order_stream(domains, "dirichlet:0.01") if d.name != CLEAN]
    skewed = np.mean([mean_run_length(d.labels) for d in ordered])
    assert iid < 1.3  # ten classes shuffled: a neighbour agrees one time in ten
    assert skewed > 5 * iid
    assert skewed > 20


def test_the_repeat_order_sends_one_image_a_thousand_times_then_the_clean_half(domains):
    ordered = order_stream(domains, REPEAT)
    assert [d.name for d in ordered] == [REPEAT, CLEAN]
    repeated = ordered[0]
    assert len(repeated.inputs) == REPEATS == 1000
    assert (repeated.inputs == domains[0].inputs[0]).all()
    assert (repeated.labels == domains[0].labels[0]).all()
    assert ordered[1] is domains[-1]


def test_the_spike_order_sets_one_value_of_one_clean_sample(domains):
    ordered = order_stream(domains, "spike:1000")
    assert [d.name for d in ordered] == [SPIKE, CLEAN]
    spiked, clean = ordered[0], domains[-1]
    changed = np.argwhere(spiked.inputs != clean.inputs)
    assert len(changed) == 1 and changed[0][0] == SPIKE_AT
    assert spiked.inputs.max() == 1000.0 and clean.inputs.max() <= 1.0  # the stream is untouched
    assert (spiked.labels == clean.labels).all() and ordered[1] is clean


@pytest.mark.parametrize("order", [MIXED, "mixed:0.1"])
def test_the_mixed_orders_put_every_corruption_in_one_domain(domains, order):
    ordered = order_stream(domains, order, seed=7)
    assert [d.name for d in ordered] == [MIXED, CLEAN]
    corrupted = [d for d in domains if d.name != CLEAN]
    mixed = ordered[0]
    assert _rows(mixed) == sorted(r for d in corrupted for r in _rows(d))  # each image once
    assert np.bincount(mixed.labels, minlength=10).tolist() == \
        np.bincount(np.concatenate([d.labels for d in corrupted]), minlength=10).tolist()
    assert ordered[1] is domains[-1]
    # corruptions interleaved: the first 900 samples are not the first domain's
    assert _rows(Domain("", mixed.inputs[:899], mixed.labels[:899])) != _rows(corrupted[0])
    runs = mean_run_length(mixed.labels)
    assert runs > 20 if order == "mixed:0.1" else runs < 1.5  # classes in runs, or shuffled
    assert order_stream(domains, order, seed=7)[0].labels.tolist() == mixed.labels.tolist()


def test_the_imbalanced_order_keeps_a_long_tail_of_each_domain(domains):
    ordered = order_stream(domains, "imbalanced:100", seed=7)
    assert [d.name for d in ordered] == [d.name for d in domains]
    for before, after in zip(domains, ordered, strict=True):
        if before.name == CLEAN:
            assert after is before  # the clean half stays balanced
            continue
        counts = np.sort(np.bincount(after.labels, minlength=10))
        assert counts[-1] == pytest.approx(100 * counts[0], rel=0.25)  # most / rarest ~ 100
        assert set(_rows(after)) <= set(_rows(before))  # a subset, each image at most once
        assert len(_rows(after)) == len(set(_rows(after)))
    firsts = [int(np.bincount(d.labels).argmax()) for d in ordered if d.name != CLEAN]
    assert len(set(firsts)) > 1  # each domain its own ranking of the classes


def test_callers_each_send_their_share_in_order(domains):
    requests = client_requests(100, 8, 4, np.random.default_rng(0))
    covered = np.concatenate([np.arange(start, end) for _, start, end in requests])
    assert sorted(covered.tolist()) == list(range(100))  # every sample once
    assert all(0 < end - start <= 4 for _, start, end in requests)
    for caller, share in enumerate(np.array_split(np.arange(100), 8)):
        mine = np.concatenate([np.arange(s, e) for c, s, e in requests if c == caller])
        assert mine.tolist() == share.tolist()  # its own contiguous share, in order
    assert [c for c, _, _ in requests] != sorted(c for c, _, _ in requests)  # interleaved
    assert client_requests(10, 1, 4, np.random.default_rng(0)) == [(0, 0, 4), (0, 4, 8), (0, 8, 10)]


def test_callers_naming_their_groups_are_followed_apart_in_process(domains):
    tiny = _cut(domains, [domains[0].name, CLEAN], 64)
    results = run_grid(tiny, ["bn"], ["robust"], ["iid"], [4], clients=4,
                       client_groups=(False, True))
    assert [(r.method, r.client_groups) for r in results] == \
        [("none", False), ("bn", False), ("bn", True)]
    assert results[2].mode.startswith("in process, batch 4, 4 callers naming their groups")


def test_orders_are_checked():
    assert parse_order("dirichlet:0.01") == "dirichlet:0.01"
    assert parse_order("spike:1e3") == "spike:1e3"
    assert [parse_order(o) for o in ("mixed", "mixed:1", "imbalanced:1", "imbalanced:100")] == \
        ["mixed", "mixed:1", "imbalanced:1", "imbalanced:100"]
    for bad in ("dirichlet", "dirichlet:0", "dirichlet:x", "sorted", "spike:inf", "spike",
                "mixed:0", "imbalanced", "imbalanced:0.5", "imbalanced:inf"):
        with pytest.raises(ValueError, match="unknown order"):
            parse_order(bad)


def test_label_positions_are_a_seeded_share():
    positions = label_positions(1000, 0.25, seed=5)
    assert len(positions) == 250 == len(set(positions.tolist()))
    assert positions.tolist() == sorted(positions.tolist())
    assert positions.tolist() == label_positions(1000, 0.25, seed=5).tolist()


def test_overrides_become_settings_sections():
    sets = parse_sets(["ADAPTD_ADAPTER__NORM=balanced", "adaptd_error_memory__kind=exact",
                       "ADAPTD_SUPERVISED__ENABLED=true"])
    assert sections(sets) == {"adapter": {"norm": "balanced"},
                              "error_memory": {"kind": "exact"},
                              "supervised": {"enabled": "true"}}
    settings = method_settings("bn", "robust", sets)
    assert settings.adapter.name == "bn" and settings.adapter.norm == "balanced"
    assert settings.adapter.restore is False
    assert settings.error_memory.kind == "exact" and settings.supervised.enabled is True
    for bad in (["ADAPTER__NORM=x"], ["ADAPTD_ADAPTER__NORM"], ["ADAPTD_ADAPTER__NAME=tent"]):
        with pytest.raises(ValueError):
            parse_sets(bad)


def test_labels_in_process_are_refused(domains):
    with pytest.raises(ValueError, match="service"):
        run_in_process("none", "robust", domains[:1], label_fraction=0.1)
    with pytest.raises(SystemExit):
        main(["--methods", "none", "--label-fraction", "0.1"])


def _cut(domains: list[Domain], names: list[str], samples: int) -> list[Domain]:
    return [Domain(d.name, d.inputs[:samples], d.labels[:samples])
            for d in domains if d.name in names]


def _cells(markdown: str) -> list[dict[str, str]]:
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:]]


def test_a_tiny_grid_in_process_compares_every_run_with_none(domains):
    tiny = _cut(domains, [domains[0].name, domains[1].name, CLEAN], 64)
    results = run_grid(tiny, ["none", "bn"], ["robust"], ["iid"], [16])
    assert [(r.method, r.request_size, r.order) for r in results] == \
        [("none", 16, "iid"), ("bn", 16, "iid")]
    rows = _cells(table(results, tiny))
    assert [row["method"] for row in rows] == ["none", "bn"]
    assert rows[0]["domains worse than source"] == "0"
    assert rows[1]["domains worse than source"] in {"0", "1", "2"}
    assert rows[0]["mode"] == "in process, batch 16, robust BN"
    assert rows[0]["labels"] == "—" and rows[0]["order"] == "iid"
    assert {domains[0].name, domains[1].name, "mean", "clean after"} <= set(rows[0])


def test_none_is_run_as_the_baseline_when_the_methods_lack_it(domains):
    tiny = _cut(domains, [domains[0].name, CLEAN], 32)
    results = run_grid(tiny, ["bn"], ["robust"], ["dirichlet:0.1"], [32])
    assert [(r.method, r.baseline) for r in results] == [("none", True), ("bn", False)]
    rows = _cells(table(results))
    assert rows[0]["method"] == "none (baseline)" and rows[0]["order"] == "dirichlet:0.1"


def test_the_repeat_order_reports_changed_answers(domains):
    tiny = _cut(domains, [domains[0].name, CLEAN], 16)
    results = run_grid(tiny, ["none"], ["robust"], [REPEAT], [250])
    (none,) = results
    assert none.changed_answers == 0.0  # the source model is the source model
    rows = _cells(table(results))
    assert rows[0]["changed answers %"] == "0.0"
    assert rows[0]["domains worse than source"] == "0"


def test_the_comparison_counts_corrupted_domains_only():
    base = run_result({"a": 10.0, "b": 20.0, CLEAN: 3.0})
    other = run_result({"a": 12.0, "b": 20.0, CLEAN: 9.0})
    compare(other, base)
    assert other.worse_than_source == 1


def run_result(errors: dict[str, float]):
    from bench.digits_c import Result

    return Result("m", "in process", errors=errors)


@pytest.mark.slow
def test_labels_go_back_through_the_service(domains):
    from bench.digits_c import run_through_service

    tiny = _cut(domains, [domains[0].name, CLEAN], 40)
    result = run_through_service("none", tiny, concurrency=4, request_size=8,
                                 label_fraction=0.5, label_delay=10)
    # 80 samples, 40 labelled; those of the last 10 positions never come due
    assert 30 <= result.labels_sent <= 40
    assert result.labels_joined == result.labels_sent
    assert result.mode == "service, 8 samples/request, 4 in flight, robust BN"


def test_callers_through_the_service_name_their_groups(domains):
    from bench.digits_c import run_through_service

    tiny = _cut(domains, [domains[0].name, CLEAN], 40)
    result = run_through_service("bn", tiny, request_size=4, clients=4, client_groups=True)
    assert result.mode.startswith("service, 4 samples/request, 4 in flight, 4 callers naming")
    assert set(result.errors) == {domains[0].name, CLEAN}
    assert result.groups_followed == 4  # what the service's /v1/state said at the end


def test_with_settings_changed_the_baseline_is_still_the_source_model(domains):
    tiny = _cut(domains, [domains[0].name, CLEAN], 32)
    sets = {"ADAPTD_ADAPTER__RUNS": "filter"}
    results = run_grid(tiny, ["none"], ["robust"], ["dirichlet:0.1"], [32], overrides=sets)
    assert [(r.method, r.baseline, r.overrides) for r in results] == \
        [("none", True, {}), ("none", False, sets)]
