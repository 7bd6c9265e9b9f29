from training.report import plot_rank_vs_prior, table1_markdown


def _summary(model, served, cells, total):
    parts = {}
    for name, share, count, rank, hit in cells:
        ok = name in served
        parts[name] = {"count": count, "share": share, "served": ok,
                       "rank": rank if ok else None, "hit_rate": hit if ok else None}
    return {"model": model, "protocol": "serve", "exclude_recent": 64, "hr_k": 10, "num_negatives": 100,
            "n_events": 200,
            "served": sorted(served),
            "partitions": parts, "total": {"count": total[0], "share": total[0] / 200, "served": True,
                                           "rank": total[1], "hit_rate": total[2]},
            "rank_by_prior": [{"lo": 0, "hi": 0, "count": 5, "rank": 0.4}, {"lo": 1, "hi": 1, "count": 5, "rank": 0.3},
                              {"lo": 2, "hi": 3, "count": 10, "rank": 0.2}]}


CELLS = [("observed", 0.7, 140, 0.1234, 0.5), ("new_user", 0.2, 40, 0.25, 0.375), ("new_item", 0.05, 10, 0.3, 0.05),
         ("first_item", 0.05, 10, 0.5, 0.0)]
FELREC = _summary("FELRec-Q (keep)", {"observed", "new_user", "new_item", "first_item"}, CELLS, (190, 0.16, 0.44))
MF = _summary("MF", {"observed"}, CELLS, (140, 0.1234, 0.5))

EXPECTED = """\
**ml-100k** (protocol serve, already-seen items excluded (last 64))

| model | observed (70.0%) rank ↓ | observed (70.0%) HR@10 ↑ | new users (20.0%) rank ↓ | new users (20.0%) HR@10 ↑ | new items (5.0%) rank ↓ | new items (5.0%) HR@10 ↑ | first interaction of an item (5.0%) rank ↓ | first interaction of an item (5.0%) HR@10 ↑ | total (200 events) rank ↓ | total (200 events) HR@10 ↑ |
| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
| FELRec-Q (keep) | 0.123 | 0.500 | 0.250 | 0.375 | 0.300 | 0.050 | 0.500 | 0.000 | 0.160 | 0.440 |
| MF | 0.123 | 0.500 | – | – | – | – | – | – | 0.123 | 0.500 |

Normalized rank over the items met before each event (0 best, 0.5 random); HR@10 against 100 sampled negatives. –: partition not served by the model; total = served partitions, without first interactions of items (no model can serve an item before it exists). Already-seen items: the items of the user's last n interactions before the event score -inf for every model (what the query API leaves out), a repeat of one of them included; HR@k negatives are drawn from the other items.
"""  # noqa: E501 (the rendered report's lines, verbatim)


def test_table1_layout_with_dashes_for_unserved_partitions():
    assert table1_markdown([FELREC, MF], title="ml-100k") == EXPECTED


def test_table1_title_states_the_already_seen_rule():
    old = {k: v for k, v in MF.items() if k != "exclude_recent"}  # written before the rule: nothing excluded
    assert table1_markdown([old], title="x").startswith("**x** (protocol serve, already-seen items not excluded)")
    assert "Already-seen items" not in table1_markdown([old])


def test_table1_without_results():
    assert table1_markdown([]) == "(no results)\n"


def test_plot_writes_a_png(tmp_path):
    path = plot_rank_vs_prior([FELREC, MF, {**MF, "model": "empty", "rank_by_prior": []}], tmp_path / "sub" / "fig.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
